"""Training on several processes: ``torchrun ... -m discvae train`` with PyTorch's DistributedDataParallel.

torchrun starts one process per rank and tells each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`process_group` joins them (gloo on the CPU, nccl on CUDA, one GPU per rank) and returns the :class:`Ranks` the
training loop asks: which rows of each global batch are this rank's (``share``), sums over ranks, the model wrapped
in DDP (which averages the gradients over ranks in the backward pass). Every rank draws the same permutation of the
data from the same seeded generator and takes its contiguous share of each batch, so ``--batch-size`` is the global
batch; rank 0 alone holds the run's lock, writes config, metrics and checkpoints, and evaluates. ``encode`` and
``index`` split their images the same way (:func:`split_rows`): each rank encodes its contiguous share, rank 0
writes. Without torchrun (``WORLD_SIZE`` unset or 1) this is one rank and nothing changes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import InputError


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``world`` processes training one run, and what the loop does with it."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous share of a global batch ``rows`` (``span``: sizes differ by at most one),
        and the factor its mean loss is scaled by so that DDP's average of the ranks' gradients is the gradient of
        the global batch's mean (1 for one rank)."""
        if self.world == 1:
            return rows, 1.0
        start, stop = self.span(len(rows))
        return rows[start:stop], (stop - start) * self.world / len(rows)

    def span(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[start, stop)`` of ``n`` rows, as ``tensor_split`` cuts them (the first
        ``n % world`` ranks one row more)."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return start, start + size + (self.rank < extra)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (every rank must call it)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (its parameters broadcast from rank 0), or itself for one rank."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (every rank must call it)."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def average(self, module: torch.nn.Module) -> None:
        """Average ``module``'s gradients and floating buffers over the ranks, in place (a learning estimator's,
        which DDP does not see: its parameters get the global batch's gradient, as the model's do, and running
        statistics stay the same on every rank). Nothing for one rank."""
        if self.world == 1:
            return
        for t in [p.grad for p in module.parameters() if p.grad is not None] + \
                [b for b in module.buffers() if b.is_floating_point()]:
            dist.all_reduce(t)
            t.div_(self.world)

    def any(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (zeros and ones) or-ed over the ranks."""
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def seed_stream(self, seed: int, epoch: int) -> None:
        """Ranks other than 0 draw their samples of z and binarisations from a stream of their own, seeded anew each
        epoch from (seed, rank, epoch): a run is reproducible, and its resumption at an epoch boundary continues it
        bit for bit with the same number of ranks. Rank 0 keeps the stream a checkpoint holds."""
        if self.rank:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, epoch]).generate_state(1, np.uint64)[0]
                                  >> 1))


@contextlib.contextmanager
def process_group(device: torch.device):
    """The :class:`Ranks` of this process for the block: under torchrun the process group is joined (gloo for the
    CPU, nccl for CUDA, where each rank takes the GPU ``cuda:LOCAL_RANK``) and left afterwards; else one rank on
    ``device``. A group the caller initialised is used as it is."""
    if not launched() and not dist.is_initialized():
        yield Ranks(device=device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if joined:
            dist.destroy_process_group()


def split_rows(n: int, fn) -> list:
    """``fn(start, stop)`` on this process's contiguous share of ``n`` rows (``Ranks.span``; all of them without
    torchrun), and the results of every rank in rank order, on every rank. An ``InputError`` or ``OSError`` on any
    rank is raised on all of them, as an ``InputError`` (after the gather, so that no rank waits for one that
    failed)."""
    with process_group(torch.device("cpu")) as ranks:
        try:
            mine = (fn(*ranks.span(n)), None)
        except (InputError, OSError) as err:
            mine = (None, str(err))
        parts = ranks.gather(mine)
    errors = [error for _, error in parts if error]
    if errors:
        raise InputError(errors[0])
    return [result for result, _ in parts]
