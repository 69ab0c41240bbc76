"""Hooks into the training loop: ``train(cfg, callbacks=[...])``.

A callback subclasses :class:`Callback` and overrides the methods it needs; each is called with the loop's
:class:`~discvae.state.TrainState`. ``train`` always runs :class:`Checkpoint`, then :class:`MetricsCSV`, then
(with ``progress``) :class:`ProgressBar`, and then the caller's callbacks in the order given, so by the time a
callback sees an epoch's row, ``checkpoint.pt`` and ``metrics.csv`` hold that epoch. :class:`TensorBoard` (the
``--tensorboard DIR`` option) logs the metrics for TensorBoard.

A callback must not draw from torch's random number generators, nor change the model or the optimizer: the
checkpoint holds the generator state and a resumed run continues bit for bit only if nothing else draws.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

from tqdm.auto import tqdm

from .criteria import criterion
from .errors import InputError
from .runs import BEST, CHECKPOINT, CONFIG, METRICS, check_output, save_checkpoint, write_csv, write_json

if typing.TYPE_CHECKING:
    from .config import Config
    from .models import Terms
    from .state import TrainState


class Callback:
    """No-op hooks, called in this order: ``on_train_start`` once (also when resuming a finished run), per epoch
    ``on_epoch_start``, ``on_step_end`` after each optimizer step and ``on_epoch_end``, then ``on_train_end`` once
    training has finished (not when it stops with an exception)."""

    def on_train_start(self, state: TrainState, cfg: Config) -> None:
        """Before the first epoch (of this process: ``state.epoch`` epochs are done when resuming). ``cfg`` is the
        run's configuration as saved in ``config.json``."""

    def on_epoch_start(self, state: TrainState, batches: int) -> None:
        """Epoch ``state.epoch + 1`` is about to run ``batches`` mini-batches."""

    def on_step_end(self, state: TrainState, terms: Terms) -> None:
        """After optimizer step ``state.step``; ``terms`` (``loss``, ``neg_elbo``, ``expected_ll``, ``kl``) are the
        mini-batch's, tensors on the training device (``.item()`` waits for the device)."""

    def on_epoch_end(self, state: TrainState, row: dict) -> None:
        """Epoch ``state.epoch`` is done; ``row`` is its metrics (a row of ``metrics.csv``), ``state.history[-1]``."""

    def on_train_end(self, state: TrainState) -> None:
        """Training reached ``cfg.epochs``."""


class CallbackList(Callback):
    """Calls each of ``callbacks`` in order."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def on_train_start(self, state, cfg):
        for c in self.callbacks:
            c.on_train_start(state, cfg)

    def on_epoch_start(self, state, batches):
        for c in self.callbacks:
            c.on_epoch_start(state, batches)

    def on_step_end(self, state, terms):
        for c in self.callbacks:
            c.on_step_end(state, terms)

    def on_epoch_end(self, state, row):
        for c in self.callbacks:
            c.on_epoch_end(state, row)

    def on_train_end(self, state):
        for c in self.callbacks:
            c.on_train_end(state)


class Checkpoint(Callback):
    """Rewrites ``RUN_DIR/checkpoint.pt`` atomically after every epoch (what ``--resume`` continues from)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / CHECKPOINT

    def on_train_start(self, state, cfg):
        self.cfg = cfg

    def on_epoch_end(self, state, row):
        save_checkpoint(self.path, state.state_dict(self.cfg))


class KeepBest(Callback):
    """Scores the model after every epoch by the label-free criterion ``name`` (:mod:`discvae.criteria`), adds the
    score to the epoch's row (column ``keep_best_NAME``) and, when it beats every earlier epoch's, writes that epoch
    as the run ``RUN_DIR/best`` (``config.json``, ``checkpoint.pt``, ``metrics.csv``), which every command that reads a
    run reads (``discvae retrieval RUN_DIR/best``). ``train`` runs it before :class:`Checkpoint`, so the scores are
    in the history a resumed run continues from."""

    def __init__(self, run_dir, name: str, x_train):
        self.dir, self.column, self.criterion = Path(run_dir) / BEST, f"keep_best_{name}", criterion(name)
        self.x_train = x_train

    def on_train_start(self, state, cfg):
        self.cfg = dataclasses.replace(cfg, out=str(self.dir))
        self.score = self.criterion(self.x_train, cfg.augment, cfg.binarize, cfg.seed)
        self.best = max((row[self.column] for row in state.history), default=-math.inf)

    def on_epoch_end(self, state, row):
        row[self.column] = self.score(state.model)
        if row[self.column] > self.best:
            self.best = row[self.column]
            write_json(self.dir / CONFIG, dataclasses.asdict(self.cfg))
            save_checkpoint(self.dir / CHECKPOINT, state.state_dict(self.cfg))
            write_csv(self.dir / METRICS, state.history)


class MetricsCSV(Callback):
    """Rewrites ``RUN_DIR/metrics.csv`` atomically from ``state.history`` (one row per epoch) at the start, so a
    kill between the checkpoint's write and its own leaves nothing behind, and after every epoch."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / METRICS

    def on_train_start(self, state, cfg):
        if state.history:
            write_csv(self.path, state.history)

    def on_epoch_end(self, state, row):
        write_csv(self.path, state.history)


class ProgressBar(Callback):
    """A tqdm bar over each epoch's mini-batches (with the -ELBO of the step at its last redraw), then one line per
    epoch."""

    def on_train_start(self, state, cfg):
        self.epochs, self.bar = cfg.epochs, None

    def on_epoch_start(self, state, batches):
        self.bar = tqdm(total=batches, desc=f"epoch {state.epoch + 1}/{self.epochs}", leave=False)

    def on_step_end(self, state, terms):
        if self.bar.update():  # tqdm redrew the bar: only then read the loss (.item() waits for the device)
            self.bar.set_postfix(loss=f"{terms.neg_elbo.item():.2f}", refresh=False)

    def on_epoch_end(self, state, row):
        self.bar.close()
        tqdm.write(f"epoch {state.epoch}: train -ELBO {row['train_neg_elbo']:.2f}  "
                   f"test -ELBO {row['test_neg_elbo']:.2f}  ({state.elapsed:.1f}s)")


class TensorBoard(Callback):
    """Logs every number of each epoch's row (``train_neg_elbo``, ``test_neg_elbo``, ``grad_encoder_var``, ``time``,
    ...) as a TensorBoard scalar against the epoch, into event files in ``log_dir`` (``tensorboard --logdir
    LOG_DIR``); a resumed run adds a file beside the first. Needs the ``tensorboard`` package (``pip install
    tensorboard``, or the ``tensorboard`` extra); without it the constructor raises an ``InputError`` naming
    ``needed_by``."""

    def __init__(self, log_dir, needed_by: str = "the TensorBoard callback"):
        self.writer_class = summary_writer(needed_by)
        self.log_dir = check_output(log_dir)
        self.writer = None

    def on_epoch_end(self, state, row):
        if self.writer is None:  # created with the first row, so a run killed before it leaves no folder
            self.writer = self.writer_class(str(self.log_dir))
        for name, value in row.items():
            if name != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, state.epoch)
        self.writer.flush()  # an interrupted run keeps every finished epoch

    def on_train_end(self, state):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def summary_writer(needed_by: str):
    """``torch.utils.tensorboard.SummaryWriter``, imported now; an ``InputError`` if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(f"{needed_by} needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter
