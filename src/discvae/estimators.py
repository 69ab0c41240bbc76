"""Gradient estimators of the expected log-likelihood E_q[f(z)], f(z) = ln p(x|z).

Each estimator is one pure function ``estimator(q, f, num_samples=1, **options) -> surrogate`` of a latent
distribution ``q`` (see :mod:`discvae.distributions`, gradients flowing to the encoder through its parameters) and a
black box ``f``: ``f(z)`` takes ``z`` of shape ``[M, B', dim]`` (``B'`` the batch size, or 1 for a state shared by
the batch) and returns ``[M, B]``. The returned ``surrogate`` has shape ``[B]``: its *value* is the estimate of
E_q[f(z)] and its *gradient* is the estimated gradient. Nothing else knows which estimator runs.
"""
from __future__ import annotations

import torch

from .errors import InputError

BASELINES = ("none", "mean", "loo")


def _baseline(fz: torch.Tensor, kind: str) -> torch.Tensor | float:
    """A control variate b_mb for f(z_mb) that is independent of z_mb, so E[(f - b) grad w] = E[f grad w].

    ``loo``: the mean of f over the other M - 1 samples of the same data point; ``mean``: the mean over every other
    (sample, data point) pair of the batch.
    """
    m, n = fz.shape[0], fz.numel()
    if kind == "none":
        return 0.0
    if kind == "loo":
        if m < 2:
            raise InputError("the loo baseline needs --num-samples of at least 2")
        return (fz.sum(0, keepdim=True) - fz) / (m - 1)
    if kind == "mean":
        if n < 2:
            raise InputError("the mean baseline needs at least two samples in the batch")
        return (fz.sum() - fz) / (n - 1)
    raise InputError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def importance(q, f, num_samples: int = 1, proposal: str | torch.Tensor | None = None,
               baseline: str = "none") -> torch.Tensor:
    """Importance sampling from q_I (paper eq. 14-18).

    z_m ~ q_I, w_m = q(z_m|x) / q_I(z_m) computed in log space, estimate (1/M) sum_m w_m f(z_m).
    Gradient: decoder (1/M) sum_m w_m grad f(z_m) (eq. 18), encoder (1/M) sum_m f(z_m) grad w_m (eq. 17).
    ``proposal=None`` (or ``"posterior"``) takes xi = eta without gradient, so w_m = 1 and the encoder gradient is
    the score function f(z_m) (z_m - q)^T d eta (eq. 23, 29); otherwise ``proposal`` holds fixed natural
    parameters xi (eq. 20, 28), broadcast over the batch; ``"uniform"`` is xi = 0. ``baseline`` subtracts a
    control variate b from f in the encoder term only, (f(z_m) - b) grad w_m, which keeps the estimate unbiased
    (E_{q_I}[grad w] = grad sum_z q(z|x) = 0); the paper's estimator is ``baseline="none"``.
    """
    if proposal is None or proposal == "posterior":
        q_i = q
    elif proposal == "uniform":
        q_i = q.proposal(torch.zeros_like(q.logits))
    elif isinstance(proposal, str):
        raise InputError(f"unknown proposal {proposal!r}; use posterior, uniform or a tensor of natural parameters")
    else:
        q_i = q.proposal(torch.as_tensor(proposal, dtype=q.logits.dtype, device=q.logits.device))
    z = q_i.sample(num_samples)
    w = (q.log_prob(z) - q_i.log_prob(z).detach()).exp()
    fz = f(z)
    advantage = fz.detach() - _baseline(fz.detach(), baseline)
    return (w.detach() * fz + advantage * (w - w.detach())).mean(0)


def reparam(q, f, num_samples: int = 1) -> torch.Tensor:
    """Reparameterised sampling z = mu + sigma eps (eq. 8-11), for the Gaussian family."""
    if not hasattr(q, "rsample"):
        raise InputError("the reparam estimator needs a reparameterisable (gaussian) latent")
    return f(q.rsample(num_samples)).mean(0)


ESTIMATORS = {"importance": importance, "reparam": reparam}
