"""An estimator that learns: the score function with a baseline network of its own, trained by regression beside
the model through ``discvae.train`` -- its parameters get their own Adam (``Config.estimator_lr``), are saved in the
checkpoint and resumed bit for bit.

    python examples/learned_estimator.py            # DISCVAE_EXAMPLES_TINY=1: 2 epochs (the tests)
"""
import os

import torch
from torch import nn

from discvae import Config, LearnedEstimator, load_dataset, train


class LearnedBaseline(LearnedEstimator):
    """(1/M) sum_m f(z_m), gradient (1/M) sum_m [grad f(z_m) + (f(z_m) - b(eta)) grad ln q(z_m)], with b a small
    network of the (detached) logits: a function of x, so the estimate stays unbiased whatever b has learned. b is
    fitted by regression, min (f - b)^2: ``descend(objective)`` turns that objective into a term of value 0 whose
    gradient reaches b's parameters only, which the training loop steps."""

    def __init__(self, num_samples: int = 2, hidden: int = 32):
        super().__init__(num_samples, hidden=hidden)
        self.b = nn.Sequential(nn.LazyLinear(hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def estimate(self, q, f, num_samples):
        z = q.sample(num_samples)
        fz, log_q = f(z), q.log_prob(z)
        b = self.b(q.logits.detach()).squeeze(-1)  # [B]
        score = (fz.detach() - b.detach()) * (log_q - log_q.detach())  # value 0, gradient the score term
        return (fz + score).mean(0) - self.descend((fz.detach() - b).pow(2).mean())


tiny = bool(os.environ.get("DISCVAE_EXAMPLES_TINY"))
cfg = Config(dataset="digits", latent_dim=16, hidden=256, epochs=2 if tiny else 40, batch_size=64, lr=1e-3,
             estimator_lr=1e-2, estimator_options={"num_samples": 2}, grad_var_every=0, out="runs/learned")
state = train(cfg, data=load_dataset("digits"), estimator=LearnedBaseline(), progress=False)
fit = state.estimator.b(torch.zeros(1, 16)).item()
print(f"test -ELBO {state.history[-1]['test_neg_elbo']:.2f}; the baseline at eta = 0: {fit:.2f}")
