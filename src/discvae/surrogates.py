"""What the gradient estimators share: the leave-one-out and batch baselines, the checks of their latent and
sample count, Taylor samples (z_k, f(z_k), grad_z f(z_k)), and the surrogate that carries an estimate of the
logits' gradient. Used by :mod:`discvae.estimators` and :mod:`discvae.learned`.
"""
from __future__ import annotations

import torch

from .distributions import Bernoulli
from .errors import InputError

BASELINES = ("none", "mean", "loo")


def sample_baseline(fz: torch.Tensor, kind: str) -> torch.Tensor | float:
    """A control variate b_mb for f(z_mb) that is independent of z_mb, so E[(f - b) grad w] = E[f grad w].

    ``loo``: the mean of f over the other M - 1 samples of the same data point; ``mean``: the mean over every other
    (sample, data point) pair of the batch, or none (b = 0) for a lone sample, which has no other.
    """
    m, n = fz.shape[0], fz.numel()
    if kind == "none":
        return 0.0
    if kind == "loo":
        if m < 2:
            raise InputError("the loo baseline needs num_samples of at least 2", "num_samples")
        return (fz.sum(0, keepdim=True) - fz) / (m - 1)
    if kind == "mean":
        return (fz.sum() - fz) / (n - 1) if n > 1 else 0.0
    raise InputError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def need_samples(name: str, num_samples: int, pairs: bool = False) -> None:
    if pairs and (num_samples < 2 or num_samples % 2):
        raise InputError(f"{name} needs an even num_samples (2 per antithetic pair), got {num_samples}", "num_samples")
    if num_samples < 2:
        raise InputError(f"{name} needs num_samples of at least 2, got {num_samples}", "num_samples")


def need_bits(name: str, q) -> None:
    if not isinstance(q, Bernoulli):
        raise InputError(f"{name} needs a bernoulli latent (use rloo or exact for categoricals)")


def taylor_samples(q, f, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z_k ~ q for k = 1..K, f(z_k) ``[K, B]`` and g_k = grad_z f(z_k) ``[K, B, dim]``, the gradient of f's
    continuous extension (the decoder takes real z): K evaluations of f and one backward pass, no more."""
    z = q.sample(num_samples).requires_grad_()
    with torch.enable_grad():  # under no_grad too: the gradients are part of the estimate
        fz = f(z)
        g, = torch.autograd.grad(fz.sum(), z, retain_graph=True)
    return z.detach(), fz, g


def loo_score(v: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(1/K) sum_k (v_k - mean_{j != k} v_j) score_k for ``v`` ``[K, B]``, ``score`` ``[K, B, dim]``: ``[B, dim]``."""
    return ((v - sample_baseline(v, "loo"))[..., None] * score).mean(0)


def logit_surrogate(q, fz: torch.Tensor, grad_eta: torch.Tensor) -> torch.Tensor:
    """Value (1/K) sum_k f(z_k) (its gradient the decoder's); its gradient w.r.t. the logits eta is ``grad_eta``."""
    eta = q.logits
    return fz.mean(0) + (grad_eta.detach() * (eta - eta.detach())).sum(-1)
