"""What one training process carries from step to step and saves in a checkpoint: :class:`TrainState` (the model,
the optimizer, the shuffling generator, counters and history), and :func:`check_state`, which checks a checkpoint's
weights and optimizer state against the model before anything reads them.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import torch

from .errors import InputError, non_negative_finite
from .speed import adam

if typing.TYPE_CHECKING:
    from .config import Config
    from .estimators import Estimator
    from .models import VAE


@dataclass
class TrainState:
    """All per-process state of the loop: what a checkpoint holds and a resumed process restores."""

    model: VAE
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator
    estimator: Estimator | None = None  # what the loop trains with; one with learned state is saved with the run
    estimator_optimizer: torch.optim.Optimizer | None = None  # of the estimator's parameters, if it has any
    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The model's optimizer, and the estimator's if it learns."""
        return [self.optimizer, *([self.estimator_optimizer] if self.estimator_optimizer else [])]

    def state_dict(self, cfg: Config) -> dict:
        """The checkpoint: an estimator with state adds ``estimator`` (its ``state_dict`` and optimizer); a stateless
        one leaves the checkpoint as it always was."""
        learned = self.estimator.state_dict() if self.estimator is not None else {}
        return {"config": dataclasses.asdict(cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "shuffle": self.shuffle.get_state(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "epoch": self.epoch, "step": self.step, "elapsed": self.elapsed, "history": self.history,
                **({"estimator": {"state": learned, "optimizer": self.estimator_optimizer.state_dict()
                                  if self.estimator_optimizer else {}}} if learned else {})}

    def load_state_dict(self, ckpt: dict, rng: bool = True) -> None:
        """Continue from ``ckpt`` (checked first: ``check_state``); with ``rng`` (rank 0 of several: only it) also
        torch's random state."""
        check_state(ckpt, self.model)
        check_estimator_state(ckpt, self.estimator, self.estimator_optimizer)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.shuffle.set_state(ckpt["shuffle"])
            if "estimator" in ckpt:
                self.estimator.load_state_dict(ckpt["estimator"]["state"])
                if self.estimator_optimizer:
                    self.estimator_optimizer.load_state_dict(ckpt["estimator"]["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise InputError(f"checkpoint does not match this model: {str(err).splitlines()[0]}") from None
        if rng:
            torch.set_rng_state(ckpt["rng"])
            if ckpt["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.epoch, self.step, self.elapsed = ckpt["epoch"], ckpt["step"], ckpt["elapsed"]
        self.history = ckpt["history"]


def check_state(ckpt: dict, model: VAE, source: str = "the checkpoint") -> None:
    """An ``InputError`` unless the weights and the optimizer state in ``ckpt`` fit ``model`` (which may be on the
    meta device: only its names, shapes and dtypes are read): every tensor of the model's ``state_dict`` with its
    shape and dtype (nothing cast), finite; Adam's one parameter group with discvae's settings, a positive finite
    lr and every parameter; per parameter a ``step`` (a finite float32 count >= 0) and moments of its shape and
    dtype, finite, the second >= 0. Tensors are loaded onto one device (``map_location``). Nothing else reads
    them before this check, so a crafted file cannot drive a kernel out of bounds."""
    def refuse(what: str):
        raise InputError(f"{source} does not fit its model: {what}")

    expected, weights = model.state_dict(), ckpt["model"]
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing or extra:
        refuse(f"missing {', '.join(sorted(missing))}" if missing else
               f"unexpected {', '.join(sorted(map(str, extra)))}")
    for name, t in weights.items():
        ref = expected[name]
        if not isinstance(t, torch.Tensor) or t.layout != ref.layout or t.shape != ref.shape or t.dtype != ref.dtype:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            refuse(f"{name} is {got}, the model's {ref.dtype} {list(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{source} holds non-finite weights ({name}): the run diverged or the file was altered")
    check_adam(ckpt["optimizer"], [weights[name] for name, _ in model.named_parameters()], refuse)


def check_adam(optimizer, params: list[torch.Tensor], refuse) -> None:
    """``refuse(what)`` unless ``optimizer`` is the state of discvae's Adam (one group, its settings, a non-negative
    finite lr) over the tensors ``params``, each parameter's ``step`` and moments of its shape, dtype and device,
    finite, the second >= 0."""
    groups, state = optimizer.get("param_groups"), optimizer.get("state")
    if set(optimizer) != {"state", "param_groups"} or not isinstance(state, dict) or not isinstance(groups, list) \
            or len(groups) != 1 or not isinstance(groups[0], dict):
        refuse("its optimizer state is not Adam's {state, param_groups} with one group")
    settings = adam([torch.zeros(1, requires_grad=True)], 1.0).param_groups[0]
    group = groups[0]
    wrong = sorted(map(str, set(settings) ^ set(group))) + [k for k, v in group.items() if k in settings and k not in (
        "params", "lr") and not (type(v) is type(settings[k]) and v == settings[k])]
    indices = group.get("params")  # (an lr of 0, where a schedule of one's own may end, is allowed)
    if wrong or not (isinstance(indices, list) and all(type(i) is int for i in indices)
                     and indices == list(range(len(params)))) or not non_negative_finite(group.get("lr")):
        refuse(f"its optimizer settings differ ({', '.join(map(str, wrong)) or 'params or lr'})")
    for index, entry in state.items():
        if not (type(index) is int and 0 <= index < len(params)) or not isinstance(entry, dict) \
                or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
            refuse(f"its optimizer state {index!r} is not Adam's step, exp_avg and exp_avg_sq of a parameter")
        param, step = params[index], entry["step"]
        if not (isinstance(step, torch.Tensor) and step.layout == torch.strided and step.dtype == torch.float32
                and step.dim() == 0 and 0 <= step.item() < math.inf):
            refuse(f"the step of parameter {index} is not a finite count")
        for key in ("exp_avg", "exp_avg_sq"):
            t = entry[key]
            if not (isinstance(t, torch.Tensor) and t.layout == param.layout and t.shape == param.shape
                    and t.dtype == param.dtype and t.device == param.device and bool(torch.isfinite(t).all())
                    and (key == "exp_avg" or bool((t >= 0).all()))):
                refuse(f"{key} of parameter {index} does not match it (shape, dtype, device, finite values)")


def check_estimator_state(ckpt: dict, estimator, optimizer: torch.optim.Optimizer | None,
                          source: str = "the checkpoint") -> None:
    """An ``InputError`` unless the checkpoint's ``estimator`` entry fits ``estimator`` as ``check_state`` checks the
    model: present exactly when the estimator has state, its tensors those of ``estimator.state_dict()`` (names,
    shapes, dtypes, finite values), and the state of its Adam over its parameters."""
    expected = estimator.state_dict() if estimator is not None else {}
    entry = ckpt.get("estimator")
    name = getattr(estimator, "name", "none")
    if not expected:
        if entry is not None:
            raise InputError(f"{source} holds the state of a learning estimator; this run trains with {name}, "
                             "which has none")
        return
    if not (isinstance(entry, dict) and set(entry) == {"state", "optimizer"} and isinstance(entry["state"], dict)
            and isinstance(entry["optimizer"], dict)):
        raise InputError(f"{source} holds no state of the estimator {name} (or a malformed one)")

    def refuse(what: str):
        raise InputError(f"{source} does not fit the estimator {name}: {what}")

    saved = entry["state"]
    if set(saved) != set(expected):
        refuse(f"it holds {', '.join(sorted(map(str, saved))) or 'nothing'}, the estimator "
               f"{', '.join(sorted(expected))}")
    for key, t in saved.items():
        ref = expected[key]
        if not (isinstance(t, torch.Tensor) and t.layout == ref.layout and t.shape == ref.shape
                and t.dtype == ref.dtype and (not t.is_floating_point() or bool(torch.isfinite(t).all()))):
            refuse(f"{key} is not a finite {ref.dtype} {list(ref.shape)}")
    if optimizer is not None:
        names = [key for key, _ in estimator.named_parameters()]
        check_adam(entry["optimizer"], [saved[key] for key in names], refuse)
