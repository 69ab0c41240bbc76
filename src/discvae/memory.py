"""How much memory a training step needs, estimated before any is allocated, and how much there is.

The step is run once on PyTorch's ``meta`` device (shapes only, no data, no allocation) while a dispatch mode
tracks the bytes of the tensors alive: the forward pass's peak, which includes what autograd saves for the backward
pass. The estimate is 4 copies of the parameters (weights, gradients, Adam's two moments) plus twice that peak (the
backward pass holds about as much again).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InputError


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the meta tensors each op returns until they are freed; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                size = t.numel() * t.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def step_bytes(build_model, input_shape, batch_size: int, loss) -> int | None:
    """Estimated bytes of one training step: ``build_model()`` builds the model (called on the meta device),
    ``loss(model, x)`` runs its forward pass on a meta batch ``x`` of ``[batch_size, *input_shape]``. None when
    some operation has no meta implementation (then nothing can be said in advance)."""
    try:
        with torch.device("meta"):
            model = build_model()
        x = torch.empty(batch_size, *input_shape, device="meta")
        with _LiveBytes() as counter:
            loss(model, x)
    except (NotImplementedError, RuntimeError):
        return None
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 4 * params + 2 * counter.peak


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, MemAvailable of /proc/meminfo on a Linux
    CPU; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"



def check_fits(need: int | None, device: torch.device, what: str, advice: str, *params: str) -> None:
    """An ``InputError`` with both figures if ``what`` needs ``need`` bytes, more than ``device`` has free (nothing
    when either is unknown); ``advice`` says what to lower, ``params`` names the settings it mentions."""
    have = available_bytes(device)
    if need is not None and have is not None and need > have:
        raise InputError(f"{what} would need about {gib(need)} of memory, more than the {gib(have)} free on "
                         f"{device}; {advice}", *params)
