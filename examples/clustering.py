"""Clustering: train a VAE with one 10-way categorical latent on the digits (the class summed out exactly), then
score its clusters against the labels and against k-means on the pixels.

    python examples/clustering.py [OUT_DIR]          # DISCVAE_EXAMPLES_TINY=1: 2 epochs (the tests)
"""
import json
import os
import sys
from pathlib import Path

from discvae import Config, train
from discvae.applications.clustering import clustering

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/clusters")
epochs = 2 if os.environ.get("DISCVAE_EXAMPLES_TINY") else 100

run = out / "run"
train(Config(dataset="digits", latent="categorical", latent_dim=10, estimator="exact", epochs=epochs,
             batch_size=64, grad_var_every=0, out=str(run)), progress=False)
report = clustering([str(run)], out / "scores")  # clustering.json, confusion.png, clusters.png, report.md
scores = json.loads((out / "scores" / "clustering.json").read_text())
print(report)
print(json.dumps({name: {k: v for k, v in result.items() if k in ("acc_one_to_one", "nmi", "ari")}
                  for name, result in {**scores["runs"], **scores["baselines"]}.items()}, indent=1))
