"""A custom estimator on your own model: your encoder and decoder networks inside ``discvae.VAE``, your own
gradient estimator (REINFORCE with a leave-one-out baseline, written out), and a training loop in plain PyTorch.

    python examples/custom_estimator.py              # DISCVAE_EXAMPLES_TINY=1: 20 steps (the tests)
"""
import os

import torch
from torch import nn

from discvae import VAE, load_dataset, make_estimator
from discvae.latents import LatentSpace


def reinforce_loo(q, f, num_samples=2):
    """(1/M) sum_m f(z_m), its gradient (1/M) sum_m [grad f(z_m) + (f(z_m) - mean of the other f) grad ln q(z_m)]:
    unbiased for M >= 2 (the baseline of each sample is independent of it)."""
    z = q.sample((num_samples,))  # [M, B, dim], no gradient
    fz, log_q = f(z), q.log_prob(z)  # [M, B] each
    baseline = (fz.sum(0, keepdim=True) - fz) / (num_samples - 1)
    score = (fz - baseline).detach() * (log_q - log_q.detach())  # value 0, gradient the score term
    return (fz + score).mean(0)


torch.manual_seed(0)
data = load_dataset("digits")  # 8x8 images in [0, 1]
space = LatentSpace.parse("bernoulli", 20)  # 20 bits: the encoder gives 20 logits, the decoder reads 20 bits
encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, space.param_dim))
decoder = nn.Sequential(nn.Linear(space.dim, 128), nn.Tanh(), nn.Linear(128, 64))  # Bernoulli logits per pixel
model = VAE(encoder, decoder, space)
estimator = make_estimator(reinforce_loo, num_samples=4)  # options checked against the signature once

optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
steps = 20 if os.environ.get("DISCVAE_EXAMPLES_TINY") else 3000
for step in range(steps):
    x = data.x_train[torch.randint(len(data.x_train), (64,))].bernoulli()  # dynamic binarisation
    terms = model(x, estimator)  # Terms: loss, neg_elbo, expected_ll, kl
    optimizer.zero_grad()
    terms.loss.backward()
    optimizer.step()
    if step % 500 == 0 or step == steps - 1:
        with torch.no_grad():
            test = model(data.x_test.bernoulli(), estimator)
        print(f"step {step}: train -ELBO {terms.neg_elbo.item():.2f}, test -ELBO {test.neg_elbo.item():.2f}")
