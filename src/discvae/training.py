"""The training loop and loading trained runs.

``Config`` (:mod:`discvae.config`) is plain data (saved as ``config.json``), the estimator among it by name and
options. ``train(cfg)`` runs
Adam over shuffled mini-batches sliced from the in-memory dataset, and after every epoch appends train/test metrics
to ``metrics.csv`` and rewrites ``checkpoint.pt`` atomically (callbacks of :mod:`discvae.callbacks`, which
``train(cfg, callbacks=[...])`` extends); ``train(cfg, resume=True)`` continues bit for bit where the checkpoint left
off; ``train(cfg, estimator=my_estimator)`` trains with a function of one's own (see :func:`estimator_for`).
Everything one process owns lives in :class:`~discvae.state.TrainState`; one step is :mod:`discvae.step`'s.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from .augmentation import random_affine
from .callbacks import CallbackList, Checkpoint, KeepBest, MetricsCSV, ProgressBar
from .config import Config, differing, resolve_device
from .data import Dataset, load_dataset
from .distributed import process_group
from .errors import InputError
from .estimators import ESTIMATORS, Estimator, importance, make_estimator
from .gradients import gradient_variance
from .latents import LatentSpace
from .likelihoods import binarize
from .memory import check_fits, step_bytes
from .models import VAE, build_model
from .runs import (
    CHECKPOINT,
    CONFIG,
    LOCK,
    TEMPORARY,
    check_output,
    load_checkpoint,
    read_config,
    remove_stale_temporaries,
    run_lock,
    write_json,
)
from .speed import adam, autocast, choose_threads, flush_denormals, intra_op_threads, step_flops
from .state import TrainState, check_state
from .step import DivergenceGuard, forward_fn, objective, scaled, train_step


@torch.no_grad()
def elbo_terms(model: VAE, x: torch.Tensor, batch_size: int = 2048, binarization: str = "none",
               precision: str = "fp32") -> dict:
    """Negative ELBO and its two terms (and a hybrid's KL per block, ``Terms.values``), in nats per example, over
    all of ``x``, E_q[ln p(x|z)] by plain Monte Carlo (one z ~ q(z|x) per example), the networks in ``precision``."""
    totals = {}
    for i in range(0, len(x), batch_size):
        xb = binarize(x[i:i + batch_size], binarization)
        with autocast(precision, xb.device):
            values = model(xb, importance).values()
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value.double() * len(xb)
    return {name: (total / len(x)).item() for name, total in totals.items()}
def estimator_options(cfg: Config, step: int) -> dict:
    """``cfg.estimator_options`` at training step ``step``, with each scheduled option set by its schedule."""
    return {**cfg.estimator_options, **{name: max(end, start * math.exp(-rate * step))
                                         for name, (start, end, rate) in cfg.estimator_schedule.items()}}


def estimator_for(cfg: Config, function=None) -> Estimator:
    """The estimator ``cfg`` trains with, its options those of step 0 (``estimator_options(cfg, 0)``, the training
    loop passing the annealed ones of each step): ``function`` (a function ``estimator(q, f, **options)`` of one's
    own) if given, else the registered ``cfg.estimator``. Unknown names and options fail here."""
    return make_estimator(function or cfg.estimator, **estimator_options(cfg, 0))


def check_estimator(model: VAE, x: torch.Tensor, estimator: Estimator) -> None:
    """Fail before training starts if ``estimator`` rejects this latent family or the values of its options: one
    forward pass on the rows ``x``, without gradient, the random state restored."""
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            model(x, estimator)
    finally:
        torch.set_rng_state(rng)


def seeded_estimator(cfg: Config, function, model: VAE, x: torch.Tensor) -> Estimator:
    """The estimator a run trains with (``estimator_for``: a registered one built anew), on the model's device and
    checked by one forward pass on the rows ``x`` (``check_estimator``, which also sizes a learning estimator's lazy
    networks), all under a fork of the random state: a learning estimator's initialisation is the same in every run
    of a seed, and the run's random stream is that of any other estimator."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        estimator = estimator_for(cfg, function).to(device)
        check_estimator(model, x, estimator)
    return estimator


def probe(estimator: Estimator) -> Estimator:
    """An estimator like ``estimator`` for counting a step's memory and operations on the ``meta`` device without
    touching its state (a learning one's buffers, its lazy networks): a registered one built anew there, else a
    copy (one of the user's with lazy networks then cannot be counted, and is not)."""
    if isinstance(estimator, torch.nn.Module) and estimator.name in ESTIMATORS:
        with torch.device("meta"):
            return make_estimator(estimator.name, **estimator.options)
    return copy.deepcopy(estimator)


def check_estimand(space: LatentSpace, estimator: Estimator) -> None:
    """Refuse a registered estimator other than ``reparam`` where what it is given (``Family.estimand``) is
    Gaussian: a latent without a discrete block, or the mixture prior (which sums its categorical out)."""
    gaussian = space.mixture or all(block.num_states is None for block in space.blocks)
    if gaussian and estimator.function in ESTIMATORS.values() and estimator.name != "reparam":
        given = f"prior {space.prior} sums its categorical out" if space.mixture else \
            f"the latent {space} has no discrete block"
        raise InputError(f"estimator {estimator.name} is for discrete latents, and {given}: train the Gaussian "
                         "with estimator reparam", "estimator", "prior")


def model_for(cfg: Config, data: Dataset) -> VAE:
    return build_model(cfg.arch, data.x_train.shape[1:], cfg.space, likelihood=cfg.likelihood, init=cfg.init,
                       hidden=cfg.hidden, slope=cfg.slope)


def train(cfg: Config, resume: bool = False, progress: bool = True, data: Dataset | None = None,
          estimator=None, callbacks=None) -> TrainState:
    """Train (or continue) the run in ``cfg.out`` while holding its lock.

    Args:
        cfg: the configuration, checked first (``Config.check``); written to ``config.json``.
        resume: continue the checkpoint in ``cfg.out`` bit for bit (only the ``config.RESUMABLE`` settings may differ).
        progress: show a progress bar.
        data: the dataset, if already loaded (else ``cfg.dataset`` is loaded).
        estimator: a function ``estimator(q, f, **options) -> surrogate`` (see :mod:`discvae.estimators`) that
            trains in place of ``cfg.estimator``, with the options ``cfg.estimator_options``; ``config.json``
            records its name (the registered one, else ``module.qualname``), and resuming takes the same function.
        callbacks: :class:`~discvae.callbacks.Callback` objects, run after the built-in ones: the checkpoint,
            ``metrics.csv`` and (with ``progress``) the progress bar.

    Returns:
        The final :class:`TrainState` (``state.model``, ``state.history``: the rows of ``metrics.csv``).

    Raises:
        InputError: a setting, the data or the run directory cannot be used (before any training).
        Diverged: at the first non-finite loss or gradient (looked for every ``step.CHECK_EVERY`` steps and before
            each checkpoint), naming its step; the checkpoint of the last finished epoch is left as it was.
    """
    cfg.check()
    function, estimator = estimator, estimator_for(cfg, estimator)
    check_estimand(cfg.space, estimator)
    cfg = dataclasses.replace(cfg, estimator=estimator.name)
    out = check_output(cfg.out)
    if not resume and out.is_dir():
        check_new_run(out)  # decided before the lock file is made
    with flush_denormals(), process_group(resolve_device(cfg.device)) as ranks, \
            run_lock(out) if ranks.main else nullcontext(), ExitStack() as stack:
        if cfg.batch_size < ranks.world:
            raise InputError(f"batch_size {cfg.batch_size} is smaller than the {ranks.world} processes sharing each "
                             "batch", "batch_size")
        ckpt = open_run(cfg, out, resume) if ranks.main else load_checkpoint(out) if resume else None
        device = ranks.device
        torch.manual_seed(cfg.seed)
        data = data or load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
        check_memory(cfg, data, device, estimator)
        stack.enter_context(intra_op_threads(threads_for(cfg, data, device, estimator)))
        x_train, x_test = data.x_train.to(device), data.x_test.to(device)
        model = model_for(cfg, data).to(device)
        estimator = seeded_estimator(cfg, function, model, x_train[:2])
        learned = list(estimator.parameters())
        state = TrainState(model, adam(model.parameters(), cfg.lr), torch.Generator().manual_seed(cfg.seed),
                           estimator, adam(learned, cfg.estimator_lr) if learned else None)
        if ckpt is not None:
            state.load_state_dict(ckpt, ranks.main)
            for opt, lr in zip(state.optimizers, (cfg.lr, cfg.estimator_lr)[:len(state.optimizers)], strict=True):
                for group in opt.param_groups:
                    group["lr"] = lr
        if cfg.views:  # fails here, before training, unless the data are images (torch's stream untouched)
            random_affine(x_train[:1], **cfg.augment, generator=torch.Generator(device))
        if ranks.main:
            write_json(out / CONFIG, dataclasses.asdict(cfg))
        best = [KeepBest(out, cfg.keep_best, x_train)] if cfg.keep_best else []
        hooks = CallbackList([*best, Checkpoint(out), MetricsCSV(out), *([ProgressBar()] if progress else []),
                              *(callbacks or [])] if ranks.main else [])

        n, one = len(x_train), torch.ones((), device=device)  # one: counts the rows trained on in sums[-1]
        # the fixed mini-batch of the gradient-variance diagnostic (Fig. 5), binarised once with its own generator
        x_fixed = binarize(x_train[:cfg.batch_size], cfg.binarize, torch.Generator(device).manual_seed(cfg.seed))
        forward = forward_fn(ranks.wrap(model), estimator, cfg)
        sync = (lambda: ranks.average(estimator)) if ranks.world > 1 and estimator.state_dict() else None
        guard = DivergenceGuard(device, cfg.lr, cfg.out, agree=ranks.any)
        hooks.on_train_start(state, cfg)
        for epoch in range(state.epoch, cfg.epochs):
            model.train(), estimator.train()
            ranks.seed_stream(cfg.seed, epoch)
            start, sums = time.perf_counter(), 0.0
            order = torch.randperm(n, generator=state.shuffle).to(device)
            hooks.on_epoch_start(state, math.ceil(n / cfg.batch_size))
            for i in range(0, n - ranks.world + 1, cfg.batch_size):  # (not a last batch with fewer rows than ranks)
                rows, share = ranks.share(order[i:i + cfg.batch_size])
                images = x_train.index_select(0, rows)
                x = binarize(images, cfg.binarize)
                view = binarize(random_affine(images, **cfg.augment), cfg.binarize) if cfg.views else None
                def loss_of(terms, step=state.step, share=share):
                    return scaled(objective(terms, cfg, step), share)
                terms, health = train_step(state.optimizers, forward, x, estimator_options(cfg, state.step),
                                           loss_of, view, sync)
                state.step += 1
                # neg_elbo, expected_ll, kl (a hybrid's kl per block), the view's terms: summed on the device
                values = terms.values(cfg.contrastive_taus())
                sums = sums + torch.stack([*values.values(), one]).double() * len(x)
                if guard.record(health):
                    guard.check(epoch + 1, state.step, state.epoch)
                hooks.on_step_end(state, terms)
            guard.check(epoch + 1, state.step, state.epoch)
            state.elapsed += time.perf_counter() - start
            state.epoch = epoch + 1
            sums = ranks.all_sum(sums)  # [*values, rows] over the epoch's rows, all ranks'
            if ranks.main:  # evaluated once, by rank 0
                means = dict(zip(values, sums[:-1] / sums[-1], strict=True))
                state.history.append(epoch_row(state, cfg, means, x_test, x_fixed, estimator))
                hooks.on_epoch_end(state, state.history[-1])
        hooks.on_train_end(state)
    return state


def epoch_row(state: TrainState, cfg: Config, train_terms: dict, x_test: torch.Tensor,
              x_fixed: torch.Tensor, estimator: Estimator) -> dict:
    """The metrics of the epoch ``state.epoch`` just finished (a row of ``metrics.csv``): the train terms averaged
    over its steps, the test terms of the model as it is now and, every ``cfg.grad_var_every`` epochs, the gradient
    variance on the fixed mini-batch ``x_fixed``. Leaves the model and the estimator in eval mode (an estimator that
    learns neither learns nor updates anything while it is measured)."""
    state.model.eval(), estimator.eval()
    train_terms = {name: value.item() for name, value in train_terms.items()}
    test_terms = elbo_terms(state.model, x_test, cfg.batch_size, cfg.binarize, cfg.precision)
    grad_var = {}
    if cfg.grad_var_every and state.epoch % cfg.grad_var_every == 0:
        with autocast(cfg.precision, x_fixed.device):
            grad_var = gradient_variance(state.model, x_fixed, estimator, cfg.grad_var_repeats,
                                         **estimator_options(cfg, state.step))
    return {"epoch": state.epoch, "step": state.step, "time": round(state.elapsed, 3),
            **{f"train_{k}": v for k, v in train_terms.items()}, **{f"test_{k}": v for k, v in test_terms.items()},
            **{f"grad_{k}": v for k, v in grad_var.items()}}


def open_run(cfg: Config, out: Path, resume: bool) -> dict | None:
    """Under the run's lock: the checkpoint to continue from (``resume``), or None after checking that ``out``
    may hold a new run (``check_new_run``). Leftovers of killed writes are removed from a run directory."""
    if resume:
        ckpt = load_checkpoint(out)
        saved = Config.from_dict(ckpt["config"], f"the configuration in {out / CHECKPOINT}")
        changed = differing(cfg, saved)
        if changed:
            raise InputError(f"cannot resume {out} with a different {', '.join(changed)}")
        if cfg.epochs < ckpt["epoch"]:
            raise InputError(f"{out} has already trained {ckpt['epoch']} epochs; --epochs {cfg.epochs} would not "
                             "continue it")
    else:
        check_new_run(out)
    remove_stale_temporaries(out)
    return ckpt if resume else None


def check_new_run(out: Path) -> None:
    """An ``InputError`` unless ``out`` may hold a new run: it is empty, or holds only what a discvae run that
    stopped before its first checkpoint left there (its lock, its valid ``config.json``, temporaries of killed
    writes). Changes nothing."""
    if (out / CHECKPOINT).exists():
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    names = [p.name for p in out.iterdir() if p.name != LOCK]
    run = CONFIG in names
    foreign = sorted(n for n in names if n != CONFIG and not (run and TEMPORARY.fullmatch(n)))
    if not foreign and run:
        try:
            Config.from_dict(read_config(out))
        except InputError:
            foreign = [CONFIG]
    if foreign:
        raise InputError(f"{out} is not empty and not a discvae run (it holds {', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty --out")


def check_memory(cfg: Config, data: Dataset, device: torch.device, estimator: Estimator) -> None:
    """Refuse a configuration whose training step with ``estimator`` cannot fit in the device's free memory (see
    :mod:`discvae.memory`), with both figures."""
    counted = probe(estimator)
    need = step_bytes(lambda: model_for(cfg, data), data.x_train.shape[1:], min(cfg.batch_size, len(data.x_train)),
                      lambda model, x: model(x, counted))
    check_fits(need, device, "a training step", "lower batch_size, num_samples or latent_dim", "batch_size",
               "num_samples", "latent_dim")


def threads_for(cfg: Config, data: Dataset, device: torch.device, estimator: Estimator) -> int:
    """The intra-op threads to train with (``speed.choose_threads``): ``cfg.threads`` if set, else one for a step
    whose forward pass needs fewer than ``speed.SMALL_STEP_FLOPS`` (counted on the ``meta`` device), else torch's
    choice; never more than the cores this process may use. On a GPU, torch's setting as it is."""
    if device.type != "cpu" and cfg.threads is None:
        return torch.get_num_threads()
    counted = probe(estimator)
    flops = None if cfg.threads is not None else step_flops(
        lambda: model_for(cfg, data), data.x_train.shape[1:], min(cfg.batch_size, len(data.x_train)),
        lambda model, x: model(x, counted))
    return choose_threads(cfg.threads, flops)


def load_run(run_dir, device: str = "cpu", ckpt: dict | None = None) -> tuple[Config, VAE, Dataset]:
    """A finished or running run, as saved, checked: its ``config.json`` agrees with its checkpoint's configuration
    (``config.RESUMABLE`` settings aside) and the checkpoint fits the model (``check_state``).

    Args:
        run_dir: the run directory (``config.json`` and ``checkpoint.pt``).
        device: where the model's parameters go.
        ckpt: the checkpoint, if the caller already loaded it from ``run_dir`` (saves reading it again).

    Returns:
        ``(cfg, model, data)``: the :class:`Config`, the trained model in eval mode and the dataset.

    Raises:
        InputError: no run there, or a config or checkpoint that is unreadable or does not match.
    """
    source = f"{Path(run_dir) / CONFIG}"
    cfg = Config.from_dict(read_config(run_dir), source).check_model()
    ckpt = ckpt or load_checkpoint(run_dir, device)
    saved = Config.from_dict(ckpt["config"], f"the configuration in {Path(run_dir) / CHECKPOINT}")
    changed = differing(cfg, saved)
    if changed:
        raise InputError(f"{source} and {Path(run_dir) / CHECKPOINT} disagree on {', '.join(changed)}: the "
                         "configuration was edited or the files come from different runs")
    data = load_dataset(cfg.dataset, cfg.data_dir, False)
    with torch.device("meta"):  # shapes only: nothing is allocated for a model the checkpoint does not fit
        skeleton = model_for(cfg, data)
    check_state(ckpt, skeleton, f"{Path(run_dir) / CHECKPOINT}")
    model = model_for(cfg, data)
    model.load_state_dict(ckpt["model"])
    return cfg, model.to(device).eval(), data
