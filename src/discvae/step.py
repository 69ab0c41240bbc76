"""One optimisation step and its watch: :func:`objective` (the loss a step minimises), :func:`forward_fn` (the
model's terms under the run's precision, compiled if asked), :func:`train_step` (forward, backward, the optimizer's
update) and :class:`DivergenceGuard`, which looks for a non-finite loss or gradient without waiting for the device
at every step.
"""
from __future__ import annotations

import sys
import typing
from typing import Callable

import torch

from .errors import Diverged
from .speed import autocast, compiled

if typing.TYPE_CHECKING:
    from .config import Config
    from .estimators import Estimator
    from .models import VAE, Terms

CHECK_EVERY = 100  # steps between two looks of the divergence guard at its device-side record


def objective(terms: Terms, cfg: Config, step: int) -> torch.Tensor:
    """The loss minimised at ``step``: the negative ELBO, each block with a capacity (``cfg.capacity``) taking
    gamma |KL_block - C_block(t)| in place of its KL (Burgess et al. 2018; JointVAE, Dupont 2018), plus lambda
    times the consistency term when there is one (``cfg.consistency``), beta times the marginal KL
    (``cfg.balance``) and each contrastive term's weight times it at its temperature (``cfg.contrastive`` at
    ``cfg.contrastive_tau``, and so on: ``Config.contrastive_taus``)."""
    extra = [] if terms.consistency is None else [cfg.consistency * terms.consistency]
    if cfg.balance:
        extra.append(cfg.balance * terms.marginal_kl)
    extra += [getattr(cfg, term) * getattr(terms, term)(tau) for term, tau in cfg.contrastive_taus().items()]
    extra += [cfg.capacity_gamma * (terms.kl_blocks[name] - c).abs() - terms.kl_blocks[name]
              for name, c in cfg.capacities(step).items()]
    return sum(extra, terms.loss)  # the loss itself when there is nothing to add (no kernel, no graph node)


def scaled(loss: torch.Tensor, share: float) -> torch.Tensor:
    """``loss`` times this rank's ``share`` (``Ranks.share``): the loss itself for one process."""
    return loss if share == 1 else loss * share


def forward_fn(model: VAE, estimator: Estimator, cfg: Config):
    """``forward(x, options, view=None)``: the model's ``Terms`` on the batch ``x`` (and its ``view``) with
    ``estimator(**options)``, the networks in ``cfg.precision``; compiled with ``cfg.compile`` where the estimator
    is ``compilable`` (else one line on stderr, and the step runs uncompiled)."""
    device = next(model.parameters()).device
    if cfg.compile and not estimator.compilable:
        print(f"discvae: warning: --compile: {estimator.name} trains its own parameters inside the step, which "
              "torch.compile does not support; running without it", file=sys.stderr)

    def forward(x: torch.Tensor, options: dict, view: torch.Tensor | None = None):
        with autocast(cfg.precision, device):
            return model(x, estimator, view, **options)
    return compiled(forward) if cfg.compile and estimator.compilable else forward


def train_step(optimizer, forward: Callable, x: torch.Tensor, options: dict,
               loss_of: Callable = lambda terms: terms.loss, view: torch.Tensor | None = None,
               sync: Callable | None = None):
    """One optimisation step on the batch ``x`` (and its ``view``, if any): ``terms = forward(x, options, view)``
    (the model's ``Terms``), the gradient of ``loss_of(terms)``, ``sync()`` if given (e.g. averaging a learning
    estimator's gradients over ranks), the step of ``optimizer`` (the model's; or a list: the model's and a learning
    estimator's, whose parameters the same backward pass reaches, :mod:`discvae.learned`). Returns ``terms`` and a
    device scalar that is finite iff the loss and every gradient are (the loss plus the sum of every gradient's
    entries: half the cost of their norm, and no squares to overflow); nothing waits for the device."""
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    terms = forward(x, options, view)
    loss = loss_of(terms)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        sync()
    # the optimizers' parameters: cheaper than walking the model
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    health = torch.stack([loss.detach(), *(p.grad.sum() for p in params if p.grad is not None)]).sum()
    for opt in optimizers:
        opt.step()
    return terms, health


class DivergenceGuard:
    """Records every step's health (``train_step``'s: loss plus gradient sums) on the device and looks at the record
    every ``every`` steps and at the end of each epoch (one host synchronisation per look): :meth:`check` raises
    :class:`Diverged` naming the first step whose loss or gradient was not finite. ``agree`` (e.g. an all-reduce of
    the record across processes) makes every process see the same record."""

    def __init__(self, device: torch.device, lr: float, out: str, every: int = CHECK_EVERY,
                 agree: Callable = lambda t: t):
        self.record_ = torch.zeros(every, device=device)
        self.count, self.lr, self.out, self.agree = 0, lr, out, agree

    def record(self, health: torch.Tensor) -> bool:
        """Store one step's ``health`` (``train_step``'s); True when it is time to check."""
        self.record_[self.count] = health
        self.count += 1
        return self.count == len(self.record_)

    def check(self, epoch: int, step: int, last_epoch: int) -> None:
        """Raise :class:`Diverged` if a recorded step was not finite, naming it (``step`` is the number of the last
        step recorded, ``last_epoch`` the epoch of the last checkpoint, 0 if none); else clear the record."""
        bad = self.agree((~torch.isfinite(self.record_[:self.count])).float())
        first = int(bad.argmax()) if self.count and bool(bad.any()) else None
        if first is None:
            self.count = 0
            return
        lr, out = self.lr, self.out
        where = f"non-finite loss or gradient at epoch {epoch}, step {step - self.count + first + 1} (lr {lr:g})"
        if last_epoch:
            raise Diverged(f"{where}; the last good checkpoint (epoch {last_epoch}) is in {out}: continue it with a "
                           f"smaller lr, discvae train --resume --out {out} --lr {lr / 10:g}")
        raise Diverged(f"{where}, before the first checkpoint; start again with a smaller --lr")
