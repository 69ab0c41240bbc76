"""Image grids and PNG output (matplotlib, written atomically)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .runs import atomic_path  # noqa: E402


def image_grid(rows: list[torch.Tensor], pad: int = 1) -> np.ndarray:
    """Tile rows of images ``[n, C, H, W]`` (or ``[n, D]`` with D a square) into one grey/RGB array in [0, 1]."""
    rows = [_as_images(r.detach().float().cpu()) for r in rows]
    n = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    grid = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, img in enumerate(r.numpy()):
            grid[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = \
                img.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def _as_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x
    side = int(round(x.shape[-1] ** 0.5))
    if side * side != x.shape[-1]:
        raise ValueError(f"cannot show vectors of length {x.shape[-1]} as square images")
    return x.reshape(len(x), 1, side, side)


def save_grid(path, rows: list[torch.Tensor], scale: int | None = None) -> None:
    """Write ``image_grid(rows)`` as a PNG, each pixel ``scale`` x ``scale`` (default: images about 56 px high)."""
    grid = image_grid(rows).clip(0, 1)
    scale = scale or max(1, round(56 / _as_images(rows[0][:1]).shape[-2]))
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, grid, cmap="gray", vmin=0, vmax=1, format="png")


@torch.no_grad()
def reconstructions(model, x: torch.Tensor) -> torch.Tensor:
    """Decoder means for one z ~ q(z|x) per image (as the paper's Fig. 4), shaped like ``x``."""
    z = model.posterior(x).sample(1)
    return model.likelihood.mean(model.decode(z))[0].reshape(x.shape)
