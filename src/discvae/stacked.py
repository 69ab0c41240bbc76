"""Several runs of one model trained side by side in one process, their weights stacked: ``train_stacked(cfgs)``.

The runs may differ only in their ``seed`` and ``out``. Their R sets of weights are stacked along a new first axis
(``torch.func.stack_module_state``) and one step trains all of them: the model's forward pass is vmapped over the
runs (``torch.func.functional_call`` + ``vmap``), the loss is the sum of the runs' losses (whose gradients do not
mix: run r's loss depends on run r's slice alone), and one fused Adam updates the stacked weights. Adam is
elementwise, so this is R independent Adams; its step count, one per stacked tensor, is shared, which is right
because every run takes every step.

Random numbers: each run draws from a stream of its own, the one it would draw from trained alone (torch's global
generator after ``manual_seed(seed)`` and the model's initialisation). Inside the step the random draws -- the
binarisation of the stacked batch, and the latents' samples (``distributions.sampling``) under
``vmap(randomness="different")`` -- are made on tensors whose first axis indexes the runs, and :class:`RunStreams`
fills run r's part from run r's generator, so run r sees the numbers of its solo run in the same order. (It is a
dispatch mode, active for those draws alone: around the whole forward pass its Python per operation cost as much as
the step.) A draw of another kind, which could not be given each run's stream, is refused. Between steps (the
epoch's test -ELBO and gradient variance, the checkpoint) run r's stream is torch's global one. A stacked run
therefore trains as the same seed alone, up to the rounding of the batched matrix products, and writes what a solo
run writes -- ``config.json``, ``checkpoint.pt`` (its own weights, Adam state and random state), ``metrics.csv`` --
so ``evaluate`` reads it and ``train --resume`` (or ``train_stacked(..., resume=True)``) continues it. Each run's
``time`` is the stack's wall time: the runs trained at once.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from .callbacks import CallbackList, Checkpoint, MetricsCSV, ProgressBar
from .config import CONTRASTIVE_TERMS, Config, resolve_device
from .data import Dataset, load_dataset
from .distributions import SAMPLING
from .errors import InputError
from .likelihoods import binarize
from .models import VAE, Terms
from .runs import CONFIG, check_output, run_lock, write_json
from .speed import adam, flush_denormals, intra_op_threads
from .state import TrainState
from .step import DivergenceGuard, forward_fn, objective, train_step
from .training import (
    check_estimand,
    check_estimator,
    check_memory,
    epoch_row,
    estimator_for,
    estimator_options,
    model_for,
    open_run,
    threads_for,
)

# settings a stack's runs may differ in
PER_RUN = ("seed", "out")
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state per parameter, beside its step
# the random factories and the in-place fill each amounts to
FILLS = {"rand": "uniform_", "rand_like": "uniform_", "randn": "normal_", "randn_like": "normal_"}


class RunStreams(TorchDispatchMode):
    """While active, every random draw (an operator tagged ``nondeterministic_seeded``) is made run by run: its
    result's first axis indexes the R runs and part r is drawn from ``generators[r]``, as run r's solo draw of that
    part's shape would be. Factories (``rand``, ``randn`` and their ``_like``) become an empty tensor filled in place
    (what torch's CPU factories do); other draws go to the in-place operator with the generator of each part. A draw
    whose first axis is not R cannot be told apart by run: an ``InputError``."""

    def __init__(self, generators: list[torch.Generator]):
        super().__init__()
        self.generators = generators

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in FILLS:  # an empty tensor of the shape, dtype and device asked for, filled below
            make = torch.empty_like if name.endswith("_like") else torch.empty
            out = make(args[0], dtype=kwargs.get("dtype"), device=kwargs.get("device"))
            fill, fill_args, fill_kwargs = getattr(torch.Tensor, FILLS[name]), (), {}
        elif name.endswith("_"):
            out, fill, fill_args = args[0], getattr(torch.Tensor, name), args[1:]
            fill_kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        else:
            raise InputError(f"stacked runs cannot give each run its own stream for {func}; train them one by one")
        if out.dim() == 0 or out.shape[0] != len(self.generators):
            raise InputError(f"a random draw of shape {list(out.shape)} in a stack of {len(self.generators)} runs: "
                             "its first axis must index the runs")
        for part, generator in zip(out, self.generators, strict=True):
            fill(part, *fill_args, **fill_kwargs, generator=generator)
        return out

    @contextmanager
    def sampling(self):
        """The block's draws of latents (``distributions.sampling``) made run by run; a draw from torch's global
        generator besides them (e.g. by an estimator of one's own calling ``torch.rand_like``) is an InputError: it
        could not be given each run's stream."""
        token, before = SAMPLING.set(self), torch.get_rng_state()
        try:
            yield
        finally:
            SAMPLING.reset(token)
        if not torch.equal(before, torch.get_rng_state()):
            raise InputError("stacked runs give each run its own stream only for the draws of discvae's latents "
                             "(distributions.sampling); this step drew from torch's generator besides: train these "
                             "runs one by one")


class Stacked(nn.Module):
    """R models of one architecture as one module: ``weights[k]`` is parameter k of every model stacked ``[R, ...]``,
    and ``forward(x, estimator, view, **options)`` on a stacked batch ``x`` ``[R, B, ...]`` returns the models'
    ``Terms``, each entry ``[R]`` (run r's from its own weights and batch ``x[r]``). ``discrete`` is left out and a
    consistency view is not supported."""

    def __init__(self, models: list[VAE]):
        super().__init__()
        params, buffers = stack_module_state(models)
        if buffers:
            raise InputError("stacked runs need models without buffers")
        self.names = list(params)
        # matrices kept as [R, in, out], so that the batched products and their gradients need no transposing copy
        self.transposed = [p.dim() == 3 for p in params.values()]
        self.weights = nn.ParameterList(p.transpose(1, 2).contiguous() if t else p
                                        for p, t in zip(params.values(), self.transposed, strict=True))
        self.base = copy.deepcopy(models[0]).to("meta")

    def _run_layout(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """Stacked weight ``k`` (or a tensor of its shape, e.g. Adam's moments) in the layout of the model's
        parameter: the matrices transposed back (a view)."""
        return t.transpose(-1, -2) if self.transposed[k] else t

    def forward(self, x: torch.Tensor, estimator, view: torch.Tensor | None = None, **options) -> Terms:
        if view is not None:
            raise InputError("stacked runs train without a consistency view", "consistency")

        def one(weights, xr):
            terms = functional_call(self.base, dict(zip(self.names, weights, strict=True)), (xr, estimator), options)
            return tuple(terms[:5])  # loss, neg_elbo, expected_ll, kl, kl_blocks: tensors only
        weights = [self._run_layout(w, k) for k, w in enumerate(self.weights)]
        return Terms(*vmap(one, randomness="different")(weights, x))

    def unstack(self, models: list[VAE], optimizer: torch.optim.Optimizer, optimizers: list) -> None:
        """Copy run r's slice of the weights and of Adam's state (``optimizer``'s) into ``models[r]`` and
        ``optimizers[r]``: what a checkpoint of run r saves."""
        with torch.no_grad():
            for r, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
                for k, (stacked, p) in enumerate(zip(self.weights, model.parameters(), strict=True)):
                    p.copy_(self._run_layout(stacked, k)[r])
                    state = optimizer.state.get(stacked)
                    if state:
                        opt.state[p] = {"step": state["step"].clone(), **{
                            key: self._run_layout(state[key], k)[r].clone(memory_format=torch.contiguous_format)
                            for key in MOMENTS}}

    def stack_state(self, optimizer: torch.optim.Optimizer, optimizers: list) -> None:
        """Adam's state of the runs' ``optimizers`` (e.g. loaded from their checkpoints) stacked into ``optimizer``'s;
        they must have taken the same number of steps."""
        for k, stacked in enumerate(self.weights):
            states = [opt.state.get(opt.param_groups[0]["params"][k]) for opt in optimizers]
            if not any(states):
                continue
            steps = {float(s["step"]) if s else None for s in states}
            if len(steps) > 1:
                raise InputError("the stacked runs' optimizers took different numbers of steps")
            optimizer.state[stacked] = {"step": states[0]["step"].clone(), **{
                key: self._run_layout(torch.stack([s[key] for s in states]), k).contiguous() for key in MOMENTS}}


def check_stack(cfgs: list[Config]) -> None:
    """An ``InputError`` unless ``cfgs`` (at least one) differ only in ``PER_RUN`` settings, train on the CPU, and
    have no setting a stack cannot train (a consistency view, keep-best, compile)."""
    if not cfgs:
        raise InputError("a stack needs at least one run")
    same = [{k: v for k, v in dataclasses.asdict(c).items() if k not in PER_RUN} for c in cfgs]
    differ = sorted({k for d in same[1:] for k in d if d[k] != same[0][k]})
    if differ:
        raise InputError(f"stacked runs may differ only in {' and '.join(PER_RUN)}, not in {', '.join(differ)}",
                         *differ)
    if len({c.out for c in cfgs}) < len(cfgs):
        raise InputError("each stacked run needs its own out", "out")
    cfg = cfgs[0]
    for name, unsupported in (("consistency", cfg.consistency),
                              *((term, getattr(cfg, term)) for term in CONTRASTIVE_TERMS),
                              ("keep_best", cfg.keep_best),
                              ("compile", cfg.compile), ("device", resolve_device(cfg.device).type != "cpu")):
        if unsupported:
            raise InputError(f"stacked runs train on the CPU without {name}", name)


def check_stackable(estimator) -> None:
    """An ``InputError`` unless ``estimator`` runs on stacked weights (``Estimator.stackable``): not one that learns
    parameters of its own (one set per run), takes gradients with respect to z, or draws its randomness in place."""
    if not estimator.stackable:
        why = "it learns parameters of its own" if list(estimator.parameters()) or estimator.state_dict() else \
            "it differentiates with respect to z or draws its randomness in place, which vmap cannot"
        raise InputError(f"estimator {estimator.name} cannot train stacked ({why}); run its seeds without --stacked",
                         "stacked")


def train_stacked(cfgs: list[Config], resume: bool = False, progress: bool = False,
                  data: Dataset | None = None) -> list[TrainState]:
    """Train (or continue, ``resume``) the runs ``cfgs`` side by side with stacked weights (module docstring), each
    in its own ``cfg.out`` under that run's lock. Returns their final :class:`TrainState` s, as ``train`` would.
    Raises ``InputError`` for runs that cannot stack (``check_stack``) or whose run directories cannot be used, and
    ``Diverged`` at a non-finite loss or gradient of any of them."""
    for c in cfgs:
        c.check()
    check_stack(cfgs)
    cfg = cfgs[0]
    estimator = estimator_for(cfg)
    check_estimand(cfg.space, estimator)
    check_stackable(estimator)
    cfgs = [dataclasses.replace(c, estimator=estimator.name) for c in cfgs]
    outs = [check_output(c.out) for c in cfgs]
    with flush_denormals(), ExitStack() as stack:
        ckpts = []
        for c, out in zip(cfgs, outs, strict=True):
            stack.enter_context(run_lock(out))
            ckpts.append(open_run(c, out, resume))
        data = data or load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
        device = torch.device("cpu")
        check_memory(cfg, data, device, estimator)
        stack.enter_context(intra_op_threads(threads_for(cfg, data, device, estimator)))
        x_train, x_test = data.x_train, data.x_test
        states, streams = [], []
        for c, ckpt in zip(cfgs, ckpts, strict=True):  # each run as train() starts it
            torch.manual_seed(c.seed)
            model = model_for(c, data)
            state = TrainState(model, adam(model.parameters(), c.lr), torch.Generator().manual_seed(c.seed))
            if ckpt is not None:
                state.load_state_dict(ckpt)
                state.optimizer.param_groups[0]["lr"] = c.lr
            streams.append(torch.Generator().set_state(torch.get_rng_state()))
            states.append(state)
        if len({(s.epoch, s.step) for s in states}) > 1:
            raise InputError("the stacked runs stopped at different epochs; continue them one by one")
        check_estimator(states[0].model, x_train[:2], estimator)
        for c, out in zip(cfgs, outs, strict=True):
            write_json(out / CONFIG, dataclasses.asdict(c))
        hooks = [CallbackList([Checkpoint(out), MetricsCSV(out), *([ProgressBar()] if progress and r == 0 else [])])
                 for r, out in enumerate(outs)]
        model = Stacked([s.model for s in states])
        optimizer = adam(model.parameters(), cfg.lr)
        model.stack_state(optimizer, [s.optimizer for s in states])
        x_fixed = [binarize(x_train[:c.batch_size], c.binarize, torch.Generator().manual_seed(c.seed)) for c in cfgs]
        run_streams, plain = RunStreams(streams), forward_fn(model, estimator, cfg)

        def forward(x, options, view=None):
            with run_streams.sampling():
                return plain(x, options, view)

        guard = DivergenceGuard(device, cfg.lr, ", ".join(c.out for c in cfgs))
        lead = states[0]
        for r, state in enumerate(states):
            hooks[r].on_train_start(state, cfgs[r])
        n, ones = len(x_train), torch.ones(len(cfgs))
        for epoch in range(lead.epoch, cfg.epochs):
            model.train()
            start, sums = time.perf_counter(), 0.0
            orders = [torch.randperm(n, generator=s.shuffle) for s in states]
            hooks[0].on_epoch_start(lead, math.ceil(n / cfg.batch_size))
            for i in range(0, n, cfg.batch_size):
                with run_streams:
                    x = binarize(torch.stack([x_train.index_select(0, o[i:i + cfg.batch_size]) for o in orders]),
                                 cfg.binarize)
                def loss_of(terms, step=lead.step):
                    return objective(terms, cfg, step).sum()
                terms, health = train_step(optimizer, forward, x, estimator_options(cfg, lead.step), loss_of)
                lead.step += 1
                values = terms.values()  # each [R]
                sums = sums + torch.stack([*values.values(), ones]).double() * x.shape[1]
                if guard.record(health):
                    guard.check(epoch + 1, lead.step, lead.epoch)
                if progress:  # the bar shows the first run's loss
                    hooks[0].on_step_end(lead, terms._replace(neg_elbo=terms.neg_elbo[0]))
            guard.check(epoch + 1, lead.step, lead.epoch)
            elapsed = time.perf_counter() - start
            model.unstack([s.model for s in states], optimizer, [s.optimizer for s in states])
            for r, (state, c) in enumerate(zip(states, cfgs, strict=True)):
                state.step, state.epoch, state.elapsed = lead.step, epoch + 1, state.elapsed + elapsed
                means = dict(zip(values, sums[:-1, r] / sums[-1, r], strict=True))
                torch.set_rng_state(streams[r].get_state())  # run r's stream is torch's for its evaluation
                state.history.append(epoch_row(state, c, means, x_test, x_fixed[r], estimator))
                hooks[r].on_epoch_end(state, state.history[-1])
                streams[r].set_state(torch.get_rng_state())
        for r, state in enumerate(states):
            hooks[r].on_train_end(state)
    return states
