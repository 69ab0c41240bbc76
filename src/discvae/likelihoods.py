"""Observation models p(x|z) given the decoder output, and data binarisation.

``log_prob(x, out)`` takes data ``x`` of shape ``[B, D]`` and decoder outputs ``out`` of shape ``[M, B', D]``
with ``B'`` equal to ``B`` or 1 (one decoded z shared by the whole batch, as the exact estimator uses), and
returns ``[M, B]``. Both models are linear in x once expanded, so the shared case is one matrix multiply.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .distributions import _dot
from .errors import InputError


class BernoulliLikelihood:
    """ln p(x|z) = sum_d x_d l_d - softplus(l_d) for decoder logits l (sigmoid output of Table I).

    For grey values x in [0, 1] this is minus the binary cross-entropy, as the paper trains.
    """

    name = "bernoulli"

    @staticmethod
    def log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return _dot(logits, x) - F.softplus(logits).sum(-1)

    @staticmethod
    def mean(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


class GaussianLikelihood:
    """ln p(x|z) = ln N(x; sigmoid(l), I) = -1/2 ||x - x_hat||^2 - D/2 ln 2 pi (section I)."""

    name = "gaussian"

    @staticmethod
    def log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        x_hat = torch.sigmoid(logits)
        sq = (x * x).sum(-1) - 2 * _dot(x_hat, x) + (x_hat * x_hat).sum(-1)
        return -0.5 * sq - 0.5 * x.shape[-1] * math.log(2 * math.pi)

    @staticmethod
    def mean(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}
BINARIZE = ("none", "dynamic", "threshold")


def binarize(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``none``: grey values as they are (the paper); ``dynamic``: x ~ Bernoulli(x) on each call, as [u < x] with
    u ~ U[0, 1) (3x faster than ``torch.bernoulli`` on the CPU); ``threshold``: x > 0.5."""
    if mode == "none":
        return x
    if mode == "dynamic":
        return (torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) < x).to(x.dtype)
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    raise InputError(f"unknown binarization {mode!r}; choose one of {', '.join(BINARIZE)}")
