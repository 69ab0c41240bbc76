"""Quick start in Python: train a 16-bit Bernoulli VAE on the embedded 8x8 digits, save test digits above their
reconstructions, and read the binary codes of a few images.

    python examples/quickstart.py [OUT_DIR]        # DISCVAE_EXAMPLES_TINY=1: 2 epochs (the tests)
"""
import os
import sys

from discvae import Config, load_dataset, train
from discvae.figures import reconstructions, save_grid

out = sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"
epochs = 2 if os.environ.get("DISCVAE_EXAMPLES_TINY") else 150

data = load_dataset("digits")  # or load_dataset("mnist", "DATA")
cfg = Config(dataset="digits", binarize="threshold", latent_dim=16, lr=3e-3, epochs=epochs, batch_size=64,
             estimator_options={"num_samples": 4, "baseline": "loo"}, out=out)
state = train(cfg, data=data, progress=False)
print(f"test -ELBO after {state.epoch} epochs: {state.history[-1]['test_neg_elbo']:.2f} nats")

model = state.model.eval()
x = data.x_test[:16]
save_grid(f"{out}/reconstructions.png", [x, reconstructions(model, x)])
codes = model.codes(x)  # [16, 16] uint8 bits, q(z_i = 1|x) > 1/2
print("codes of the first 3 test digits:", ["".join(map(str, row.tolist())) for row in codes[:3]])
