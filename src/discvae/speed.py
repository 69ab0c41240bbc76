"""What makes a training step fast: bf16 autocast (``precision``), ``torch.compile`` with a fallback (``compile``),
the fused optimizer, denormals flushed to 0, and intra-op threads fitted to the step's size (``threads``).

``precision="bf16"`` runs the networks under ``torch.autocast`` in bfloat16 (but the encoder's last layer, which
computes eta, in float32: ``models.Head``) while the weights, their gradients and Adam's state stay float32; the
VAE returns its networks' outputs as float32 (``VAE.posterior``, ``VAE.decode``), so the log-space reductions after
them -- the sums of log-sigmoid / softplus terms over pixels, log-probabilities of the latents, the KL, log-sum-exps
-- run in float32 (``distributions._dot`` keeps its matrix product out of autocast). It is refused where the
hardware has no fast bf16: emulated, it would be slower than fp32.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .errors import InputError

PRECISIONS = ("fp32", "bf16")
# forward FLOPs of a training step below which one CPU thread runs it fastest: its matrix products are too small to
# share between threads (benchmarks/bench_threads.py; the quick start's step is 5e7, the paper's FC_BVAE's 5.8e9)
SMALL_STEP_FLOPS = 5e8


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, ``os.sched_getaffinity``), shared out between the
    processes that torchrun started on this machine (``LOCAL_WORLD_SIZE``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def step_flops(build_model: Callable, input_shape, batch_size: int, loss: Callable) -> int | None:
    """Floating-point operations of the forward pass of one training step, counted on PyTorch's ``meta`` device
    (no data, no arithmetic): ``build_model()`` called there, ``loss(model, x)`` on a batch of ``[batch_size,
    *input_shape]``. None when some operation has no meta implementation."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build_model()
        x = torch.empty(batch_size, *input_shape, device="meta")
        with FlopCounterMode(display=False) as counter:
            loss(model, x)
    except (NotImplementedError, RuntimeError):
        return None
    return counter.get_total_flops()


def choose_threads(requested: int | None, flops: int | None) -> int:
    """The intra-op threads for a CPU training step of ``flops`` forward FLOPs (``step_flops``): ``requested`` if
    given, else 1 for a step below ``SMALL_STEP_FLOPS`` and torch's own choice (``OMP_NUM_THREADS``, else the
    physical cores) for a larger one; never more than ``usable_cores()``."""
    if requested is not None:
        wanted = requested
    elif flops is not None and flops < SMALL_STEP_FLOPS:
        wanted = 1
    else:
        wanted = torch.get_num_threads()
    return max(1, min(wanted, usable_cores()))


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op threads set to ``n`` while the block runs, then as before it."""
    kept = torch.get_num_threads()
    if n != kept:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != kept:
            torch.set_num_threads(kept)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (``/proc/cpuinfo``: x86 ``flags``, ARM ``Features``); empty
    elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.partition(":")[2].split()}


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU that supports bf16 without emulation, or a CPU
    with AVX512-BF16 or AMX (x86) or the BF16 extension (ARM)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def check_precision(precision: str, device: torch.device) -> None:
    """InputError for an unknown precision, or for bf16 on a device without fast bf16."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}", "precision")
    if precision == "bf16" and not fast_bf16(device):
        what = "this CPU has neither AVX512-BF16 nor AMX" if device.type == "cpu" else f"{device} has no native bf16"
        raise InputError(f"precision bf16 needs fast bf16 hardware and {what}: it would run slower than fp32; use "
                         "precision fp32", "precision")


def flushing_denormals() -> bool:
    """Whether this thread now flushes CPU floats below 2^-126 to 0 (torch sets the flag but has no getter: a
    denormal times 1 tells)."""
    return bool((torch.tensor([2.0 ** -130]) * 1.0 == 0).item())


@contextmanager
def flush_denormals():
    """CPU floats below 2^-126 (denormals) read and computed as 0 while the block runs, then as before it. x86 CPUs
    compute on denormals many times slower, and a trained categorical model makes enough of them to slow its whole
    step: the paper's CNN_CVAE after 100 epochs, 1.6x (``benchmarks/bench_denormals.py``). The objective lives in
    log space, where nothing it depends on is that small."""
    kept = not flushing_denormals()
    flushed = torch.set_flush_denormal(True)  # False where the CPU cannot: nothing to undo
    try:
        yield
    finally:
        if flushed and kept:
            torch.set_flush_denormal(False)


def autocast(precision: str, device: torch.device):
    """The context the networks run in: ``torch.autocast`` to bfloat16 for ``bf16``, a no-op for ``fp32``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def no_autocast(device: torch.device):
    """``torch.autocast`` turned off on ``device`` (nothing to turn off on devices without autocast, e.g. meta)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda", "mps") else nullcontext()


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` whose step, for one group of float tensors on one device with the plain
    update (no amsgrad, maximize or weight decay), is what Adam's own step runs there -- every step count + 1, then
    one ``torch._fused_adam_`` over the parameters with a gradient: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) -- without the Python around it (grouping by device and
    dtype, the profiler's record: 0.1-0.15 ms of a 2.5 ms step of the 200-bit model; also in ``zero_grad``). The
    same numbers, state and ``state_dict`` as Adam's; anything else (a closure, several groups, other settings,
    registered step hooks) goes to Adam's step."""

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        if closure is not None or len(self.param_groups) > 1 or group["amsgrad"] or group["maximize"] \
                or group["weight_decay"] or group["decoupled_weight_decay"] or not isinstance(group["lr"], float) \
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks \
                or _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
            return super().step(closure)
        params = [p for p in group["params"] if p.grad is not None]
        if not params or len({(p.device, p.dtype) for p in params}) > 1:
            return super().step(closure)
        for p in params:
            if not self.state[p]:
                self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
        states = [self.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(params, [p.grad for p in params], [state["exp_avg"] for state in states],
                           [state["exp_avg_sq"] for state in states], [], steps, amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], maximize=False)

    step.hooked = True  # torch.optim.Optimizer wraps a step not so marked in its profiling and hooks

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Every gradient set to None, without Adam's profiler record; ``set_to_none=False``: Adam's zeroing."""
        if not set_to_none:
            return super().zero_grad(False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel (one pass over all parameters; measured fastest in
    ``benchmarks/bench_small_batch.py``, against the single-tensor and ``foreach`` implementations), stepped
    without Python around it (:class:`FusedAdam`)."""
    return FusedAdam(params, lr=lr, fused=True)


def compiled(fn: Callable, what: str = "--compile") -> Callable:
    """``torch.compile(fn)``, compiled on its first call; where compiling fails (no C++ compiler, an unsupported
    platform or Python), ``fn`` itself from then on, after one line on stderr. The random state is restored before
    the fallback runs, so a run that fell back is the run without ``compile``."""
    def fall_back(err: Exception) -> Callable:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"discvae: warning: {what}: torch.compile does not work here ({type(err).__name__}: {reason}); "
              "running without it", file=sys.stderr)
        return fn

    try:
        fast = torch.compile(fn)
    except Exception as err:  # noqa: BLE001 - whatever stops torch.compile, the step runs uncompiled
        return fall_back(err)
    first = True

    def call(*args, **kwargs):
        nonlocal fast, first
        if not first:
            return fast(*args, **kwargs)
        first, rng = False, torch.get_rng_state()
        try:
            return fast(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - an error of fn itself is raised again by the eager call below
            torch.set_rng_state(rng)
            fast = fall_back(err)
            return fn(*args, **kwargs)
    return call
