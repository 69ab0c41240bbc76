"""Label-free criteria that score a model's discrete codes, for keeping the best epoch (``train --keep-best``).

A criterion is a function ``criterion(model, x, augment, binarization, seed) -> float`` of the model, a fixed set of
training images ``x`` and the run's augmentation and binarisation; larger is better. It looks at no label, so the
epoch it picks is chosen as a user without labels would choose it.
"""
from __future__ import annotations

import torch

from .augmentation import random_affine
from .errors import InputError
from .likelihoods import binarize

PROBE_IMAGES = 2000  # training images each criterion looks at (the first of a fixed random draw)


def invariance(model, x: torch.Tensor, augment: dict, binarization: str, seed: int = 0) -> float:
    """1 - E d(c(x), c(t(x))) / E d(c(x), c(x')): how much nearer an image's code lies to the code of its own
    random view t(x) (``augmentation.random_affine`` with ``augment``) than to the code of another image x', d the
    number of code coordinates that differ (the Hamming distance of bits, of a categorical's groups). 1: every view
    keeps its image's code while images differ; 0: a view is as far as another image (or every code is the same);
    it falls when the codes follow pixel detail that a small shift or slant changes, which is when retrieval by
    class gets worse."""
    generator = torch.Generator(x.device).manual_seed(seed)
    view = random_affine(x, **augment, generator=generator)
    codes = model.codes(binarize(x, binarization, generator))
    views = model.codes(binarize(view, binarization, generator))
    others = codes.roll(1, 0)  # x' = the previous image of the probe: a fixed random pairing
    near = (codes != views).sum(-1).double().mean()
    far = (codes != others).sum(-1).double().mean()
    return float(1 - near / far) if far > 0 else 0.0


CRITERIA = {"invariance": invariance}


def probe_images(x_train: torch.Tensor, seed: int, n: int = PROBE_IMAGES) -> torch.Tensor:
    """The training images a criterion scores: ``n`` of them drawn without replacement by their own generator
    (``seed``), so that choosing them leaves torch's random stream untouched."""
    rows = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:n]
    return x_train[rows.to(x_train.device)]


def criterion(name: str):
    """The criterion called ``name`` (a key of :data:`CRITERIA`)."""
    if name not in CRITERIA:
        raise InputError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}", "keep_best")
    return CRITERIA[name]
