"""Label-free criteria that score a model's discrete codes, for keeping the best epoch (``train --keep-best``).

A criterion is made once from the training images, ``Criterion(x_train, augment, binarization, seed)`` (it draws
its probe images and whatever it needs with its own generator, leaving torch's random stream alone), and then
called on the model after each epoch, ``criterion(model) -> float``; larger is better. It looks at no label, so the
epoch it picks is chosen as a user without labels would choose it. d is the number of code coordinates that differ
(the Hamming distance of bits, the number of a categorical's groups in another class).
"""
from __future__ import annotations

import numpy as np
import torch

from .augmentation import random_affine
from .errors import InputError
from .likelihoods import binarize

PROBE_IMAGES = 1000  # training images each criterion ranks from or looks at
SCALE = 0.1  # the neighbourhood of ``Neighbours``: this fraction of the training set (a class of ten)
BLOCK = 100  # probe images per block of input-space distances


def probe_rows(n: int, seed: int, size: int = PROBE_IMAGES) -> torch.Tensor:
    """``size`` rows of ``n`` drawn without replacement by their own generator (``seed``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def code_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a_i, b_j), the number of coordinates in which two codes differ, ``[len(a), len(b)]`` int64 (in blocks of
    rows of ``a`` comparing at most 2^24 coordinates at once)."""
    rows = max(1, 2**24 // max(1, b.numel()))
    return torch.cat([(a[i:i + rows, None, :] != b[None]).sum(-1) for i in range(0, len(a), rows)])


def radius_counts(dist: np.ndarray, relevant: np.ndarray, n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query (row) and radius r = 0..n_bits: the number of database items with d <= r and of relevant
    ones, each ``[Q, n_bits + 1]``."""
    cells = (np.arange(len(dist))[:, None] * (n_bits + 1) + dist).ravel()
    size, shape = dist.shape[0] * (n_bits + 1), (len(dist), n_bits + 1)
    found = np.bincount(cells, minlength=size).reshape(shape).cumsum(1)
    hits = np.bincount(cells[relevant.ravel()], minlength=size).reshape(shape).cumsum(1)
    return found, hits


def average_precision(distances: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Per row, the average precision of ranking the items by ``distances`` (int, ``[Q, N]``) against ``relevant``
    (bool ``[Q, N]``), items at equal distance forming one threshold (as ``sklearn.metrics.average_precision_score``
    of minus the distance): AP = sum_r (R_r - R_{r-1}) / R P_r, R_r and P_r the recall and precision within d <= r
    (``radius_counts``)."""
    found, hits = radius_counts(distances.numpy(), relevant.numpy(), int(distances.max()))
    gained = np.diff(hits, axis=1, prepend=0)
    ap = (gained * hits / np.maximum(found, 1)).sum(1) / np.maximum(hits[:, -1], 1)
    return torch.from_numpy(ap)


class Invariance:
    """1 - E d(c(x), c(t(x))) / E d(c(x), c(x')): how much nearer an image's code lies to the code of its own
    random view t(x) (``random_affine`` with the run's ``augment``) than to the code of another image x'. 1: every
    view keeps its image's code while images differ; 0: a view is as far as another image (or every code is the
    same)."""

    def __init__(self, x_train: torch.Tensor, augment: dict, binarization: str, seed: int = 0):
        generator = torch.Generator(x_train.device).manual_seed(seed)
        x = x_train[probe_rows(len(x_train), seed).to(x_train.device)]
        self.x = binarize(x, binarization, generator)
        self.views = binarize(random_affine(x, **augment, generator=generator), binarization, generator)

    def __call__(self, model) -> float:
        codes, views = model.codes(self.x), model.codes(self.views)
        near = (codes != views).sum(-1).double().mean()
        far = (codes != codes.roll(1, 0)).sum(-1).double().mean()  # x' = the previous probe image
        return float(1 - near / far) if far > 0 else 0.0


class Neighbours:
    """The mean average precision of ranking the training images by the code distance to each of ``PROBE_IMAGES``
    training images (the image itself left out), relevant being its ``SCALE`` N nearest training images in input
    space (Euclidean): the retrieval mAP with the labels replaced by neighbourhoods of a class's size. Codes that
    follow pixel detail rank near-duplicates first and lose the class-sized neighbourhood; codes that merge too much
    tie it with the rest."""

    def __init__(self, x_train: torch.Tensor, augment: dict, binarization: str, seed: int = 0):
        self.rows = probe_rows(len(x_train), seed).to(x_train.device)
        self.x = binarize(x_train, binarization, torch.Generator(x_train.device).manual_seed(seed))
        flat = x_train.flatten(1)
        k = max(1, round(SCALE * (len(x_train) - 1)))
        self.relevant = torch.zeros(len(self.rows), len(x_train), dtype=torch.bool)
        for i in range(0, len(self.rows), BLOCK):
            near = torch.cdist(flat[self.rows[i:i + BLOCK]], flat).cpu()
            near[torch.arange(len(near)), self.rows[i:i + BLOCK].cpu()] = torch.inf  # not the image itself
            self.relevant[i:i + BLOCK].scatter_(1, near.topk(k, largest=False).indices, True)

    def __call__(self, model) -> float:
        codes = model.codes(self.x)
        distances = code_distances(codes[self.rows.cpu()], codes)
        distances[torch.arange(len(self.rows)), self.rows.cpu()] = distances.max() + 1  # the image itself last
        return float(average_precision(distances, self.relevant).mean())


CRITERIA = {"invariance": Invariance, "neighbours": Neighbours}


def criterion(name: str):
    """The criterion class called ``name`` (a key of :data:`CRITERIA`)."""
    if name not in CRITERIA:
        raise InputError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}", "keep_best")
    return CRITERIA[name]
