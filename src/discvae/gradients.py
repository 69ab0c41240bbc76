"""Gradient statistics of an estimator on a fixed mini-batch (the paper's Fig. 5, bottom).

``gradient_samples`` draws R independent gradient estimates of the training loss; ``gradient_variance`` reduces
them to the variance per parameter averaged over the encoder's (and separately the decoder's) parameters, and the
squared norm of the mean gradient (the signal against that noise).
"""
from __future__ import annotations

import torch

from .estimators import importance


def gradient_samples(loss_fn, params: list[torch.Tensor], repeats: int) -> torch.Tensor:
    """``repeats`` independent evaluations of grad ``loss_fn()`` w.r.t. ``params``, flattened: ``[repeats, P]``."""
    if repeats < 2:
        raise ValueError("gradient statistics need at least 2 repeats")
    rows = []
    for _ in range(repeats):
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows)


def moments(samples: torch.Tensor) -> dict:
    """Unbiased per-coordinate variance averaged over coordinates, and ||mean||^2, of ``[R, P]`` samples."""
    return {"var": samples.var(0).mean().item(), "mean_sq": samples.mean(0).pow(2).sum().item()}


def gradient_variance(model, x: torch.Tensor, estimator=importance, repeats: int = 16, **options) -> dict:
    """Keys ``encoder_var``, ``encoder_mean_sq``, ``decoder_var``, ``decoder_mean_sq`` for the loss of ``model`` on
    the fixed batch ``x`` with ``estimator(q, f, **options)`` (a function or a registered name, as ``model``
    takes it); ``R = repeats`` independent estimates."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    decoder = [p for p in model.decoder.parameters() if p.requires_grad]
    samples = gradient_samples(lambda: model(x, estimator, **options).loss, encoder + decoder, repeats)
    n_enc = sum(p.numel() for p in encoder)
    out = {}
    for part, block in (("encoder", samples[:, :n_enc]), ("decoder", samples[:, n_enc:])):
        out.update({f"{part}_{k}": v for k, v in moments(block).items()})
    return out
