"""Bounds on and exact values of the test log-likelihood ln p(x).

* ``iwae_bound``: ln (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016), <= ln p(x), tight as
  K -> infinity and exact for any K when q(z|x) is the true posterior. K is processed in chunks so memory stays
  bounded.
* ``exact_log_likelihood``: ln p(x) = logsumexp_z [ln p(x|z) + ln p(z)] over every latent state, for latents small
  enough to enumerate (a categorical's c classes; c^G for G groups; 2^c bits). Each state is decoded once and
  shared by the whole batch.
"""
from __future__ import annotations

import math

import torch

from .likelihoods import binarize


@torch.no_grad()
def iwae_bound(model, x: torch.Tensor, k: int = 1000, chunk: int = 100, batch_size: int = 500) -> torch.Tensor:
    """The K-sample importance-weighted bound on ln p(x) for every row of ``x``, shape ``[N]`` (nats)."""
    if k < 1 or chunk < 1 or batch_size < 1:
        raise ValueError("k, chunk and batch_size must be positive")
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        q = model.posterior(xb)
        total = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=x.device)
        for start in range(0, k, chunk):
            z = q.sample(min(chunk, k - start))
            log_w = model.log_likelihood(xb, z) + q.prior_log_prob(z) - q.log_prob(z)
            total = torch.logaddexp(total, torch.logsumexp(log_w.double(), 0))
        out.append(total - math.log(k))
    return torch.cat(out)


@torch.no_grad()
def exact_log_likelihood(model, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """ln p(x) by summing p(x|z) p(z) over every latent state, shape ``[N]`` (nats)."""
    states = model.posterior(x[:1]).enumerate()[:, None, :]  # [S, 1, dim]
    prior = model.posterior(x[:1]).prior_log_prob(states)  # [S, 1]
    return torch.cat([torch.logsumexp((model.log_likelihood(x[i:i + batch_size], states) + prior).double(), 0)
                      for i in range(0, len(x), batch_size)])


def fixed_binarization(x: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """The evaluation set binarised once, reproducibly (dynamic binarisation draws with its own generator)."""
    return binarize(x, mode, torch.Generator(x.device).manual_seed(seed))
