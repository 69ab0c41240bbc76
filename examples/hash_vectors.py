"""Hashing your own vectors: train a Bernoulli VAE on an ``.npy`` array of vectors in [0, 1], turn every vector
into a 32-bit code and find a query's nearest neighbours by Hamming distance.

    python examples/hash_vectors.py [VECTORS.npy] [OUT_DIR]   # DISCVAE_EXAMPLES_TINY=1: 2 epochs (the tests)

Without VECTORS.npy it writes one to try: scikit-learn's digits as flat 64-dimensional vectors.
"""
import os
import sys
from pathlib import Path

import numpy as np

from discvae import Config, load_dataset, train
from discvae.applications.retrieval import hamming_knn, pack

out = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/vectors")
epochs = 2 if os.environ.get("DISCVAE_EXAMPLES_TINY") else 100
if len(sys.argv) > 1:
    path = sys.argv[1]
else:  # an example file: [N, 64] float32 in [0, 1]
    from sklearn.datasets import load_digits

    out.mkdir(parents=True, exist_ok=True)
    path = str(out.parent / "vectors.npy")
    np.save(path, (load_digits().data / 16).astype(np.float32))

data = load_dataset(path)  # flat [N, D] stays flat; the last 10% are the test set
cfg = Config(dataset=path, arch="fc", hidden=256, latent_dim=32, epochs=epochs, batch_size=64,
             estimator="disarm", estimator_options={"num_samples": 2}, grad_var_every=0, out=str(out))
model = train(cfg, data=data, progress=False).model.eval()

database = pack(model.codes(data.x_train).numpy())  # [N, 4] uint8: 32 bits per vector
queries = pack(model.codes(data.x_test[:5]).numpy())
dist, idx = hamming_knn(queries, database, k=3)
for q, (d, i) in enumerate(zip(dist, idx, strict=True)):
    print(f"query {q}: nearest {i.tolist()} at Hamming distances {d.tolist()}")
