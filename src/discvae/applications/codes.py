"""``discvae encode``: a run's deterministic codes and posterior parameters for every image of a split, as ``.npz``.

The codes are ``VAE.codes``: bits [q(z_i = 1|x) > 1/2], a categorical's most probable class per group, a Gaussian's
means; ``probs`` are ``VAE.encode``'s posterior probabilities (means). The images are fed as the run was evaluated:
a run trained on binarised data sees them binarised once (``evaluation.fixed_binarization``, seed 0).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import distributed
from ..data import Dataset
from ..distributed import split_rows
from ..errors import InputError
from ..evaluation import fixed_binarization
from ..latents import Block
from ..runs import atomic_path, run_label
from ..training import load_run

SPLITS = ("train", "test", "all")


def split_images(data: Dataset, split: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """The images of ``split`` (``all``: train then test) and their labels, None when the dataset has none."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    parts = [("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)]
    chosen = [(x, y) for name, x, y in parts if split in (name, "all")]
    x = torch.cat([x for x, _ in chosen])
    labelled = all(y is not None for _, y in chosen)
    return x, torch.cat([y for _, y in chosen]).numpy() if labelled else None


def labels_of(data: Dataset, split: str, what: str) -> np.ndarray:
    """The labels of ``split``; an ``InputError`` naming ``what`` needs them when the dataset has none."""
    labels = split_images(data, split)[1]
    if labels is None:
        raise InputError(f"{what} needs class labels, and dataset {data.name!r} has none for its {split} split")
    return labels


def load_coded_run(run_dir, family: type | None = None, ckpt: dict | None = None):
    """``training.load_run(run_dir, ckpt=ckpt)`` -> (config, model, data); ``family``: the family the run's code
    must have (its one discrete block, or its only block), e.g. ``Bernoulli`` for hashing."""
    cfg, model, data = load_run(run_dir, ckpt=ckpt)
    block = code_block(model)
    if family and block.family is not family:
        raise InputError(f"{run_dir} has a {model.space} latent; this needs one {family.name} block "
                         f"(beside Gaussian ones at most)")
    return cfg, model, data


def code_block(model) -> Block:
    """The block of ``model``'s latent whose states ``model.codes`` returns: its discrete block, else its only
    block."""
    return model.space.code_block or model.space.blocks[0]


def one_dataset(configs) -> None:
    """An ``InputError`` unless all ``configs`` (run configurations) name the same dataset."""
    datasets = {cfg.dataset for cfg in configs}
    if len(datasets) > 1:
        raise InputError(f"the runs must share one dataset, got {', '.join(sorted(datasets))}")


def load_coded_runs(run_dirs, family: type, reserved=()) -> dict:
    """Label (``runs.run_label``: the directory's name, ``PARENT/best`` for a kept best epoch) -> (config, model,
    data) of each of ``run_dirs``: runs coded by a ``family`` block on one dataset, whose labels are distinct and
    none of ``reserved``."""
    names = [run_label(r) for r in run_dirs]
    if len(set(names)) < len(names) or set(names) & set(reserved):
        taboo = f", other than {', '.join(reserved)}," if reserved else ""
        raise InputError(f"run directories need distinct names{taboo} to label them: {', '.join(names)}")
    runs = {name: load_coded_run(run, family) for name, run in zip(names, run_dirs, strict=True)}
    one_dataset(cfg for cfg, _, _ in runs.values())
    return runs


def encode_run(run_dir, out, split: str = "all", batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Encode the images of a split with a trained run and write them as an ``.npz`` (atomically). Under torchrun
    each rank encodes its contiguous share of the images and rank 0 writes the file.

    Args:
        run_dir: a trained run directory.
        out: the ``.npz`` file to write.
        split: ``train``, ``test`` or ``all`` (train then test).
        batch_size: images per encoder call.

    Returns:
        The arrays written: ``codes`` (one row per image: :meth:`~discvae.models.VAE.codes`), ``probs``
        (:meth:`~discvae.models.VAE.encode`), ``labels`` (when the dataset has them), ``packed`` (``np.packbits``
        of the bits along the last axis, when the code is bits), ``latent`` (the latent's spec), ``latent_dim`` and
        ``groups`` (of the block giving the code: ``code_block``), ``split``.
    """
    if batch_size < 1:
        raise InputError("batch_size must be at least 1", "batch_size")
    cfg, model, data = load_run(run_dir)
    x, labels = split_images(data, split)
    inputs = fixed_binarization(x, cfg.binarize)  # all of it on every rank: the same binarisation as one process
    parts = split_rows(len(inputs), lambda start, stop: (model.codes(inputs[start:stop], batch_size).numpy(),
                                                          model.encode(inputs[start:stop], batch_size).numpy()))
    codes, probs = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    block = code_block(model)
    arrays = {"codes": codes, "probs": probs, "latent": np.array(str(model.space)), "latent_dim": np.array(block.size),
              "groups": np.array(block.groups), "split": np.array(split),
              **({} if labels is None else {"labels": labels}),
              **({"packed": np.packbits(codes, axis=-1)} if block.family.binary else {})}
    if distributed.rank() == 0:
        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return arrays


def framed_grid(path, rows: list[torch.Tensor], frames, title: str) -> None:
    """Rows of images (``figures.image_grid``, 2-pixel gaps) with a coloured frame around the image in column
    ``j`` of row ``i`` for each ``(i, j, colour)`` of ``frames``, under ``title``; a palette PNG at ``path``. The
    images are shown about 56 pixels high, smaller when there are many rows."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from ..figures import image_grid, save_figure

    pad, dpi, title_px = 2, 100, 30
    grid = image_grid(rows, pad)
    h = (grid.shape[0] - pad) // len(rows) - pad
    w = (grid.shape[1] - pad) // max(len(r) for r in rows) - pad
    scale = max(1, min(round(56 / h), 2000 // grid.shape[0]))  # screen pixels per image pixel
    height = grid.shape[0] * scale + title_px
    fig = Figure(figsize=(grid.shape[1] * scale / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, grid.shape[0] * scale / height))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    for i, j, colour in frames:  # a line in the middle of the gap, 0.6 image pixels but at least 2 pixels wide
        ax.add_patch(Rectangle((pad + j * (w + pad) - 1.5, pad + i * (h + pad) - 1.5), w + 2, h + 2, fill=False,
                               edgecolor=colour, lw=max(2.0, 0.6 * scale) * 72 / dpi))
    fig.text(0.5, 1 - 0.5 * title_px / height, title, ha="center", va="center", fontsize=9)
    save_figure(path, fig)
