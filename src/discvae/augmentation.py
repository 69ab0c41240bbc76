"""Random transformations of image batches: the views t(x) of the consistency term (``Config.consistency``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError

AUGMENT = {"rotation": 15.0, "shift": 2.0, "scale": 0.1}  # the default t: +-15 degrees, +-2 pixels, +-10% size


def random_affine(x: torch.Tensor, rotation: float, shift: float, scale: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``x`` rotated, shifted and scaled about its centre by its own random amounts.

    Args:
        x: images ``[B, C, H, W]``, values in [0, 1].
        rotation: the angle is uniform in [-rotation, rotation] degrees.
        shift: each of the two offsets is uniform in [-shift, shift] pixels.
        scale: the size factor is uniform in [1 - scale, 1 + scale].
        generator: the random numbers' source (default: torch's global one).

    Returns:
        ``[B, C, H, W]``, bilinearly interpolated (``grid_sample``), zero outside the image; ``x`` (up to rounding)
        when all three ranges are 0. ``random_affine(x, **AUGMENT)`` is the default transformation.
    """
    if x.dim() != 4:
        raise InputError(f"random transformations need images [B, C, H, W], got a batch of shape {list(x.shape)}")
    b, _, h, w = x.shape
    u = torch.rand(b, 4, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1  # U[-1, 1): angle, dx, dy, size
    angle, size = u[:, 0] * math.radians(rotation), 1 + u[:, 3] * scale
    cos, sin = angle.cos() / size, angle.sin() / size  # output -> input coordinates: the inverse map
    offset = u[:, 1:3] * shift * 2 / torch.tensor([w, h], dtype=x.dtype, device=x.device)  # pixels -> [-1, 1] units
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], -1), torch.stack([sin, cos, offset[:, 1]], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)
