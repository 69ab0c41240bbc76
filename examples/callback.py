"""A callback: keep the best epoch's test -ELBO and stop training when it has not improved for a while.

    python examples/callback.py [OUT_DIR]          # DISCVAE_EXAMPLES_TINY=1: 3 epochs (the tests)

A callback sees each epoch once it is saved (after the checkpoint and metrics.csv); it must not draw torch random
numbers or change the model, so that the run still resumes bit for bit.
"""
import os
import sys

from discvae import Callback, Config, train


class EarlyStop(Callback):
    """Remembers the best test -ELBO; raises StopTraining after ``patience`` epochs without improvement."""

    class StopTraining(Exception):
        pass

    def __init__(self, patience=10):
        self.patience, self.best, self.best_epoch = patience, float("inf"), 0

    def on_epoch_end(self, state, row):
        if row["test_neg_elbo"] < self.best:
            self.best, self.best_epoch = row["test_neg_elbo"], state.epoch
        elif state.epoch - self.best_epoch >= self.patience:
            raise self.StopTraining(f"no improvement since epoch {self.best_epoch}")


out = sys.argv[1] if len(sys.argv) > 1 else "runs/callback"
epochs = 3 if os.environ.get("DISCVAE_EXAMPLES_TINY") else 300
stop = EarlyStop(patience=10)
try:
    train(Config(dataset="digits", latent_dim=16, epochs=epochs, batch_size=64, grad_var_every=0, out=out),
          progress=False, callbacks=[stop])
except EarlyStop.StopTraining as reason:  # the checkpoint of the last epoch is saved: --resume continues it
    print("stopped:", reason)
print(f"best test -ELBO {stop.best:.2f} at epoch {stop.best_epoch}")
