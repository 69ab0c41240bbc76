"""Configuration, the training loop and loading trained runs.

``Config`` is plain data (saved as ``config.json``). ``train(cfg)`` runs Adam over shuffled mini-batches sliced from
the in-memory dataset, and after every epoch appends train/test metrics to ``metrics.csv`` and rewrites
``checkpoint.pt`` atomically; ``train(cfg, resume=True)`` continues bit for bit where the checkpoint left off.
Everything one process owns lives in :class:`TrainState`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Dataset, load_dataset
from .errors import InputError
from .estimators import ESTIMATORS
from .gradients import gradient_variance
from .likelihoods import BINARIZE, binarize
from .models import INITS, VAE, build_model
from .runs import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    load_checkpoint,
    read_config,
    save_checkpoint,
    write_csv,
    write_json,
)

# what may change when a run is resumed
RESUMABLE = ("epochs", "device", "data_dir", "download", "out", "grad_var_every", "grad_var_repeats")


@dataclass
class Config:
    """Everything a run depends on. Defaults are the paper's MNIST settings (section VI)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    download: bool = False
    arch: str = "fc"
    init: str = "torch"
    latent: str = "bernoulli"
    latent_dim: int = 50
    groups: int = 1
    likelihood: str = "bernoulli"
    binarize: str = "none"
    estimator: str = "importance"
    estimator_options: dict = field(default_factory=lambda: {"num_samples": 1})
    # option -> [start, end, rate]: the option is max(end, start * exp(-rate * step)) (annealing, Jang et al. 2017)
    estimator_schedule: dict = field(default_factory=dict)
    epochs: int = 300
    batch_size: int = 2048
    lr: float = 1e-3
    seed: int = 0
    grad_var_every: int = 1
    grad_var_repeats: int = 16
    device: str = "auto"
    out: str = "runs/mnist"

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def check(self) -> "Config":
        for name, value, ok in [("epochs", self.epochs, self.epochs >= 0), ("batch-size", self.batch_size,
                                self.batch_size >= 1), ("lr", self.lr, self.lr > 0)]:
            if not ok:
                raise InputError(f"--{name} must be positive, got {value}")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.binarize not in BINARIZE:
            raise InputError(f"unknown binarization {self.binarize!r}; choose one of {', '.join(BINARIZE)}")
        if self.grad_var_every < 0 or self.grad_var_repeats < 2:
            raise InputError("--grad-var-every must be >= 0 (0: never) and --grad-var-repeats >= 2")
        if self.estimator_options.get("num_samples", 1) < 1:
            raise InputError("--num-samples must be at least 1")
        for name, value in self.estimator_schedule.items():
            if len(value) != 3 or not all(isinstance(v, (int, float)) and v >= 0 for v in value) or value[0] <= 0:
                raise InputError(f"the schedule of {name} must be [start > 0, end >= 0, rate >= 0], got {value}")
        resolve_device(self.device)
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def value_estimator(model: VAE) -> str:
    """The estimator used to report metrics: plain Monte Carlo from q (importance with xi = eta), or reparam."""
    return "reparam" if model.latent == "gaussian" else "importance"


@torch.no_grad()
def elbo_terms(model: VAE, x: torch.Tensor, batch_size: int = 2048, binarization: str = "none") -> dict:
    """Negative ELBO and its two terms, in nats per example, over all of ``x`` (one sample of z per example)."""
    totals = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = binarize(x[i:i + batch_size], binarization)
        t = model(xb, value_estimator(model))
        totals += torch.tensor([t.neg_elbo.item(), t.expected_ll.item(), t.kl.item()]) * len(xb)
    neg_elbo, ell, kl = (totals / len(x)).tolist()
    return {"neg_elbo": neg_elbo, "expected_ll": ell, "kl": kl}


def estimator_options(cfg: Config, step: int) -> dict:
    """``cfg.estimator_options`` at training step ``step``, with each scheduled option set by its schedule."""
    return {**cfg.estimator_options, **{name: max(end, start * math.exp(-rate * step))
                                         for name, (start, end, rate) in cfg.estimator_schedule.items()}}


def check_estimator(model: VAE, x: torch.Tensor, cfg: Config) -> None:
    """Fail before training starts if the estimator rejects its options or this latent family."""
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            model(x, cfg.estimator, **estimator_options(cfg, 0))
    except TypeError as err:
        raise InputError(f"estimator {cfg.estimator!r} does not take these options: {err}") from None
    finally:
        torch.set_rng_state(rng)


@dataclass
class TrainState:
    """All per-process state of the loop: what a checkpoint holds and a resumed process restores."""

    model: VAE
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator
    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list)

    def state_dict(self, cfg: Config) -> dict:
        return {"config": dataclasses.asdict(cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "shuffle": self.shuffle.get_state(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "epoch": self.epoch, "step": self.step, "elapsed": self.elapsed, "history": self.history}

    def load_state_dict(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.shuffle.set_state(ckpt["shuffle"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise InputError(f"checkpoint does not match this model: {str(err).splitlines()[0]}") from None
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.epoch, self.step, self.elapsed = ckpt["epoch"], ckpt["step"], ckpt["elapsed"]
        self.history = ckpt["history"]


def model_for(cfg: Config, data: Dataset) -> VAE:
    return build_model(cfg.arch, data.x_train.shape[1:], cfg.latent, cfg.latent_dim, cfg.groups, cfg.likelihood,
                       cfg.init)


def train(cfg: Config, resume: bool = False, progress: bool = True, data: Dataset | None = None) -> TrainState:
    """Train (or with ``resume`` continue) the run in ``cfg.out``; returns the final state."""
    cfg.check()
    out = Path(cfg.out)
    if resume:
        ckpt = load_checkpoint(out)
        changed = [k for k, v in ckpt["config"].items() if k not in RESUMABLE and getattr(cfg, k) != v]
        if changed:
            raise InputError(f"cannot resume {out} with a different {', '.join(changed)}")
    elif (out / CHECKPOINT).exists():
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = data or load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    x_train, x_test = data.x_train.to(device), data.x_test.to(device)
    model = model_for(cfg, data).to(device)
    state = TrainState(model, torch.optim.Adam(model.parameters(), lr=cfg.lr),
                       torch.Generator().manual_seed(cfg.seed))
    if resume:
        state.load_state_dict(ckpt)
    check_estimator(model, x_train[:2], cfg)
    write_json(out / CONFIG, dataclasses.asdict(cfg))

    n = len(x_train)
    # the fixed mini-batch of the gradient-variance diagnostic (Fig. 5), binarised once with its own generator
    x_fixed = binarize(x_train[:cfg.batch_size], cfg.binarize, torch.Generator(device).manual_seed(cfg.seed))
    for epoch in range(state.epoch, cfg.epochs):
        model.train()
        start, sums = time.perf_counter(), torch.zeros(3, dtype=torch.float64)
        order = torch.randperm(n, generator=state.shuffle).to(device)
        bar = tqdm(range(0, n, cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress)
        for i in bar:
            x = binarize(x_train[order[i:i + cfg.batch_size]], cfg.binarize)
            terms = model(x, cfg.estimator, **estimator_options(cfg, state.step))
            state.optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            state.optimizer.step()
            state.step += 1
            sums += torch.tensor([terms.neg_elbo.item(), terms.expected_ll.item(), terms.kl.item()]) * len(x)
            bar.set_postfix(loss=f"{terms.neg_elbo.item():.2f}", refresh=False)
        state.elapsed += time.perf_counter() - start
        model.eval()
        train_terms = dict(zip(("neg_elbo", "expected_ll", "kl"), (sums / n).tolist(), strict=True))
        test_terms = elbo_terms(model, x_test, cfg.batch_size, cfg.binarize)
        state.epoch = epoch + 1
        grad_var = {}
        if cfg.grad_var_every and state.epoch % cfg.grad_var_every == 0:
            grad_var = gradient_variance(model, x_fixed, cfg.estimator, cfg.grad_var_repeats,
                                         **estimator_options(cfg, state.step))
        state.history.append({"epoch": state.epoch, "step": state.step, "time": round(state.elapsed, 3),
                              **{f"train_{k}": v for k, v in train_terms.items()},
                              **{f"test_{k}": v for k, v in test_terms.items()},
                              **{f"grad_{k}": v for k, v in grad_var.items()}})
        save_checkpoint(out / CHECKPOINT, state.state_dict(cfg))
        write_csv(out / METRICS, state.history)
        if progress:
            tqdm.write(f"epoch {state.epoch}: train -ELBO {train_terms['neg_elbo']:.2f}  "
                       f"test -ELBO {test_terms['neg_elbo']:.2f}  ({state.elapsed:.1f}s)")
    return state


def load_run(run_dir, device: str = "cpu", ckpt: dict | None = None) -> tuple[Config, VAE, Dataset]:
    """The config, trained model (eval mode) and dataset of a finished or running run; ``ckpt``, a checkpoint the
    caller already loaded from it, saves reading it again."""
    cfg = Config.from_dict(read_config(run_dir))
    ckpt = ckpt or load_checkpoint(run_dir, device)
    data = load_dataset(cfg.dataset, cfg.data_dir, False)
    model = model_for(cfg, data)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as err:
        raise InputError(f"checkpoint in {run_dir} does not match its config: {str(err).splitlines()[0]}") from None
    return cfg, model.to(device).eval(), data
