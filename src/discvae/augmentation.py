"""Random transformations of image batches: the views t(x) of the consistency and contrastive terms
(``Config.consistency``, ``Config.contrastive``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError

# the default t: +-15 degrees, +-2 pixels, +-10% size, horizontal shear +-0.4 (the slant of handwriting), no flip
AUGMENT = {"rotation": 15.0, "shift": 2.0, "scale": 0.1, "shear": 0.4, "flip": 0.0}


def random_affine(x: torch.Tensor, rotation: float = 0.0, shift: float = 0.0, scale: float = 0.0, shear: float = 0.0,
                  flip: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``x`` sheared, rotated, scaled, shifted and perhaps mirrored about its centre by its own random
    amounts.

    Args:
        x: images ``[B, C, H, W]``, values in [0, 1].
        rotation: the angle is uniform in [-rotation, rotation] degrees.
        shift: each of the two offsets is uniform in [-shift, shift] pixels.
        scale: the size factor is uniform in [1 - scale, 1 + scale].
        shear: the horizontal shear k is uniform in [-shear, shear]: a point h pixels above the centre moves k h
            pixels to the right (a slant of atan k), before the rotation.
        flip: the probability that an image is also mirrored left to right (a garment stays a garment; a digit
            does not stay the same digit). Drawn only when positive, so 0 leaves the random stream as it was.
        generator: the random numbers' source (default: torch's global one).

    Returns:
        ``[B, C, H, W]``, bilinearly interpolated (``grid_sample``), zero outside the image; ``x`` (up to rounding)
        when every range is 0 (the default of each). ``random_affine(x, **AUGMENT)`` is ``--consistency``'s default.
    """
    if x.dim() != 4:
        raise InputError(f"random transformations need images [B, C, H, W], got a batch of shape {list(x.shape)}")
    b, _, h, w = x.shape
    u = torch.rand(b, 5, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1  # U[-1, 1) each
    angle, size, k = u[:, 0] * math.radians(rotation), 1 + u[:, 3] * scale, u[:, 4] * shear * h / w
    cos, sin = angle.cos() / size, angle.sin() / size
    # output -> input coordinates (affine_grid's theta, in [-1, 1] units, y downwards): the inverse of size R S,
    # S = [[1, -k], [0, 1]] the shear, R = [[c, -s], [s, c]] the rotation: S^-1 R^-1 / size
    inverse = torch.stack([torch.stack([cos - k * sin, sin + k * cos], -1), torch.stack([-sin, cos], -1)], 1)
    if flip:  # the output's x mirrored first: the inverse map's first column changes sign
        sign = 1 - 2 * (torch.rand(b, generator=generator, device=x.device) < flip).to(x.dtype)
        inverse = inverse * torch.stack([sign, torch.ones_like(sign)], -1)[:, None, :]
    offset = u[:, 1:3] * shift * 2 / torch.tensor([w, h], dtype=x.dtype, device=x.device)  # pixels -> [-1, 1] units
    grid = F.affine_grid(torch.cat([inverse, offset[..., None]], -1), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)
