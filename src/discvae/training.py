"""Configuration, the training loop and loading trained runs.

``Config`` is plain data (saved as ``config.json``), the estimator among it by name and options. ``train(cfg)`` runs
Adam over shuffled mini-batches sliced from the in-memory dataset, and after every epoch appends train/test metrics
to ``metrics.csv`` and rewrites ``checkpoint.pt`` atomically (callbacks of :mod:`discvae.callbacks`, which
``train(cfg, callbacks=[...])`` extends); ``train(cfg, resume=True)`` continues bit for bit where the checkpoint left
off; ``train(cfg, estimator=my_estimator)`` trains with a function of one's own (see :func:`estimator_for`).
Everything one process owns lives in :class:`TrainState`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
import typing
from contextlib import ExitStack, nullcontext
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import torch

from .augmentation import AUGMENT, random_affine
from .callbacks import CallbackList, Checkpoint, KeepBest, MetricsCSV, ProgressBar
from .criteria import CRITERIA
from .data import DATASETS, Dataset, load_dataset
from .distributed import process_group
from .errors import InputError
from .estimators import BASELINES, ESTIMATORS, Estimator, importance, make_estimator
from .flags import Flag, documented, setting
from .gradients import gradient_variance
from .latents import DEFAULT_SIZE, FAMILIES, PRIORS, LatentSpace
from .likelihoods import BINARIZE, LIKELIHOODS, binarize
from .memory import check_fits, step_bytes
from .models import ARCHS, INITS, VAE, Terms, build_model, check_width
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
from .speed import (
    PRECISIONS,
    DivergenceGuard,
    adam,
    autocast,
    check_precision,
    choose_threads,
    compiled,
    flush_denormals,
    intra_op_threads,
    step_flops,
    train_step,
)

# what may change when a run is resumed (a smaller lr continues a run that diverged)
RESUMABLE = ("epochs", "lr", "device", "data_dir", "download", "out", "grad_var_every", "grad_var_repeats",
             "precision", "compile", "threads")
MAX_SEED = 2**63 - 1
SKLEARN_MAX_SEED = 2**32 - 1  # scikit-learn's random_state


def capacity_flag(text: str) -> dict:
    """The value of ``--capacity BLOCK=CMAX:STEPS``: ``{BLOCK: [CMAX, STEPS]}``."""
    name, _, rest = text.partition("=")
    c_max, _, steps = rest.partition(":")
    try:
        return {name: [float(c_max), int(steps)]}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BLOCK=CMAX:STEPS, e.g. categorical=2.3:25000") from None


@documented
@dataclass
class Config:
    """Everything a run depends on, saved as its ``config.json``; defaults are the paper's MNIST settings (section
    VI). Each field declares its command-line flag (:mod:`discvae.flags`): ``discvae train`` has one per field,
    ``compare`` and ``reproduce`` those they do not fix themselves.

    ``estimator`` is a name of ``discvae.ESTIMATORS`` (or, once trained with ``train(estimator=fn)``, the qualified
    name of ``fn``) and ``estimator_options`` the keyword arguments it is called with; ``estimator_schedule`` maps an
    option to ``[start, end, rate]``, the option at step t being ``max(end, start * exp(-rate * t))`` (annealing,
    Jang et al. 2017). ``check()`` validates the whole configuration. Each attribute is described below by the help
    of its flag.
    """

    dataset: str = setting("mnist", Flag(f"{', '.join(DATASETS)} or a .npy/.npz file"))
    data_dir: str | None = setting(None, Flag("folder holding mnist/ and fashion-mnist/ (default $DISCVAE_DATA, "
                                              "else ~/.cache/discvae)"))
    download: bool = setting(False, Flag("fetch missing MNIST/Fashion-MNIST files"))
    arch: str = setting("fc", Flag("Table I architecture", choices=ARCHS))
    hidden: int | None = setting(None, Flag("width of the hidden layers of the fc (default 1024) and nonlinear "
                                            "(default 200) architectures"))
    init: str = setting("torch", Flag("weight initialisation: torch (PyTorch's default) or he (N(0, 2/fan_in), zero "
                                      "biases)", choices=INITS))
    latent: str = setting("bernoulli", Flag(
        f"latent family: {', '.join(FAMILIES)} (sized by --latent-dim and --groups), or blocks with their sizes "
        "joined by +, e.g. categorical:10+gaussian:10, bernoulli:32+gaussian:8, categorical:10x20 (20 groups)"))
    latent_dim: int | None = setting(None, Flag(f"bits, classes per group, or Gaussian dims (default {DEFAULT_SIZE})"))
    groups: int = setting(1, Flag("independent categorical groups"))
    prior: str = setting("standard", Flag(
        "p(z): standard (uniform classes and bits, N(0, I)); learned (the bits' and classes' probabilities "
        "learned, a factorised prior as in the ARM / DisARM benchmark; Gaussian blocks N(0, I)); or mixture, for a "
        "latent categorical:C+gaussian:K: "
        "p(y) p(z|y) = (1/C) N(z; mu_y, I) with learned means, the decoder reading z alone, y summed out exactly "
        "(GMVAE / VaDE clustering; train with --estimator reparam)", choices=PRIORS))
    likelihood: str = setting("bernoulli", Flag("p(x|z)", choices=list(LIKELIHOODS)))
    binarize: str = setting("none", Flag("data binarisation", choices=BINARIZE))
    estimator: str = setting("importance", Flag("gradient estimator", choices=list(ESTIMATORS)))
    estimator_options: dict = setting(
        MISSING,
        Flag("samples of z per data point, M", type=int, key="num_samples"),
        Flag("importance proposal q_I: xi = eta (default, eq. 23/29) or uniform (xi = 0)",
             choices=("posterior", "uniform"), key="proposal"),
        Flag("control variate of the importance estimator: none (default, the paper), mean (over the rest of the "
             "batch) or loo (over the other M-1 samples)", choices=BASELINES, key="baseline"),
        Flag("temperature of gumbel / st-gumbel (default 1)", type=float, key="tau"),
        factory=lambda: {"num_samples": 1})
    estimator_schedule: dict = setting(
        MISSING,
        Flag("anneal tau as max(END, START exp(-RATE step)) (Jang et al. 2017); overrides --tau", type=float,
             nargs=3, metavar=("START", "END", "RATE"), key="tau", name="tau_anneal"),
        factory=dict)
    # block name -> [C_max nats, steps]: optimise gamma |KL_block - C(t)|, C(t) = C_max min(1, t / steps) (JointVAE)
    capacity: dict = setting(MISSING, Flag(
        "a capacity for a block of the latent (JointVAE): its KL term becomes gamma |KL - C(t)|, C rising linearly "
        "from 0 to CMAX nats over STEPS steps; repeat for several blocks", type=capacity_flag,
        metavar="BLOCK=CMAX:STEPS"), factory=dict)
    capacity_gamma: float = setting(30.0, Flag("gamma of --capacity"))
    consistency: float = setting(0.0, Flag(
        "weight lambda of a consistency term for the discrete blocks (IMSAT, Hu et al. 2017): the loss gains lambda "
        "E_x KL(q(y|x) || q(y|t(x))), q(y|x) held fixed, t a random shear, rotation, scaling and shift of the image "
        "(--shear, --rotation, --scale, --shift), so that codes and clusters do not follow slant or position; "
        "images only; 0: the ELBO alone"))
    balance: float = setting(0.0, Flag(
        "weight beta of a balance term for the discrete blocks: the loss gains beta KL(q_bar(y) || p(y)), q_bar the "
        "batch's mean of q(y|x) -- the part of the KL term that measures how unevenly the codes or clusters are "
        "used (Hoffman & Johnson 2016; IMSAT's marginal entropy) -- against one cluster taking several classes; "
        "0: the ELBO alone"))
    augment: dict = setting(
        MISSING,
        Flag("t of --consistency: largest rotation, degrees", type=float, key="rotation"),
        Flag("t of --consistency: largest shift, pixels", type=float, key="shift"),
        Flag("t of --consistency: largest relative change of size", type=float, key="scale"),
        Flag("t of --consistency: largest horizontal shear (slant), a point h pixels above the centre moving up to "
             "SHEAR h pixels sideways", type=float, key="shear"),
        Flag("t of --consistency: probability of a left-right mirror (for garments, not digits)", type=float,
             key="flip"),
        factory=lambda: dict(AUGMENT))
    keep_best: str | None = setting(None, Flag(
        "after every epoch score the codes by a criterion that uses no labels and keep the best epoch as the run "
        "OUT/best: neighbours (the retrieval mAP of training images with each image's nearest tenth of the "
        "training set in pixel space as its relevant items) or invariance (how much nearer the code of an image's "
        "random view t(x) is than another image's)", choices=CRITERIA))
    epochs: int = setting(300, Flag("epochs to train"))
    batch_size: int = setting(2048, Flag("images per step"))
    lr: float = setting(1e-3, Flag("Adam learning rate"))
    seed: int = setting(0, Flag("fixes every random number"))
    grad_var_every: int = setting(1, Flag("record gradient variance every N epochs (0: never)"))
    grad_var_repeats: int = setting(16, Flag("independent gradient estimates R for it"))
    device: str = setting("auto", Flag("auto, cpu, cuda, cuda:N or mps"))
    precision: str = setting("fp32", Flag("fp32, or bf16: the networks under autocast in bfloat16; weights, "
                                          "optimizer state and log-space sums in fp32; needs a GPU with bf16 or a "
                                          "CPU with AVX512-BF16 or AMX", choices=PRECISIONS))
    compile: bool = setting(False, Flag("torch.compile the training step (falls back to eager, with one line, "
                                        "where no compiler works)"))
    threads: int | None = setting(None, Flag(
        "CPU threads for the networks' matrix products (default: chosen for the model's size -- one for a step too "
        "small to share, else torch's choice; never more than the cores this process may use); a runtime setting, "
        "free to change on resume"))
    out: str = setting("runs/mnist", Flag("run directory (default runs/DATASET-ARCH-LATENT-ESTIMATOR-sSEED)"))

    def __post_init__(self):
        """Every field has its declared type (an int where a float is declared becomes a float)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), hints[f.name]))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        """The configuration saved as ``d`` (e.g. a run's ``config.json``), its keys and types checked."""
        if not isinstance(d, dict):
            raise InputError(f"{source} must be a mapping of settings, not {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"{source}: unknown settings {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except InputError as err:
            raise InputError(f"{source}: {err}", *err.params) from None

    def check(self) -> "Config":
        """Fail on any setting that cannot train, before anything is loaded or written."""
        for name, ok, need in [("epochs", self.epochs >= 1, "at least 1"), ("batch_size", self.batch_size >= 1,
                               "at least 1"), ("lr", 0 < self.lr < math.inf, "a positive finite number"),
                               ("capacity_gamma", 0 < self.capacity_gamma < math.inf, "a positive finite number")]:
            if not ok:
                raise InputError(f"{name} must be {need}, got {getattr(self, name)}", name)
        check_seed(self.seed)
        self.check_model()
        names = [block.name for block in self.space.blocks]
        for name, value in self.capacity.items():
            if name not in names:
                raise InputError(f"capacity of {name!r}: the latent {self.space} has the blocks {', '.join(names)}",
                                 "capacity")
            if not (isinstance(value, list) and len(value) == 2 and (_positive_finite(value[0]) or value[0] == 0)
                    and isinstance(value[1], int) and not isinstance(value[1], bool) and value[1] >= 1):
                raise InputError(f"the capacity of {name} must be [C_max >= 0 nats, steps >= 1], got {value!r}",
                                 "capacity")
        for name in ("consistency", "balance"):
            if not 0 <= getattr(self, name) < math.inf:
                raise InputError(f"{name} must be a finite number >= 0, got {getattr(self, name)}", name)
            if getattr(self, name) and not any(block.family.discrete for block in self.space.blocks):
                raise InputError(f"{name} needs a latent with a discrete block, not {self.space}", name)
        if self.keep_best is not None:
            if self.keep_best not in CRITERIA:
                raise InputError(f"unknown keep_best criterion {self.keep_best!r}; choose one of "
                                 f"{', '.join(CRITERIA)}", "keep_best")
            if not any(block.family.discrete for block in self.space.blocks):
                raise InputError(f"keep_best scores discrete codes; the latent {self.space} has none", "keep_best")
        unknown = set(self.augment) - set(AUGMENT)
        if unknown:
            raise InputError(f"augment takes {', '.join(AUGMENT)} (those left out are 0), not {', '.join(unknown)}")
        for name, value in self.augment.items():
            if not (_positive_finite(value) or value == 0):
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}", name)
        for name, limit, need in (("scale", self.augment.get("scale", 0) < 1, "below 1 (sizes 1 +- scale)"),
                                  ("flip", self.augment.get("flip", 0) <= 1, "a probability, at most 1")):
            if not limit:
                raise InputError(f"{name} must be {need}, got {self.augment[name]}", name)
        if self.grad_var_every < 0 or self.grad_var_repeats < 2:
            raise InputError("grad_var_every must be >= 0 (0: never) and grad_var_repeats >= 2", "grad_var_every",
                             "grad_var_repeats")
        num_samples = self.estimator_options.get("num_samples", 1)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise InputError(f"num_samples must be an integer of at least 1, got {num_samples!r}", "num_samples")
        if "tau" in self.estimator_options and not _positive_finite(self.estimator_options["tau"]):
            raise InputError(f"tau must be a positive finite number, got {self.estimator_options['tau']!r}", "tau")
        for name, value in self.estimator_schedule.items():
            if not (isinstance(value, list) and len(value) == 3 and all(_positive_finite(v) or v == 0 for v in value)
                    and value[0] > 0):
                raise InputError(f"the schedule of {name} must be [start > 0, end >= 0, rate >= 0], finite, "
                                 f"got {value!r}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be at least 1, got {self.threads}", "threads")
        check_precision(self.precision, resolve_device(self.device))
        return self

    def check_model(self) -> "Config":
        """Fail on a setting that cannot build the model (the part of ``check`` a trained run must pass too)."""
        for name, value, choices in [("init", self.init, INITS), ("binarize", self.binarize, BINARIZE),
                                     ("likelihood", self.likelihood, LIKELIHOODS), ("arch", self.arch, ARCHS)]:
            if value not in choices:
                raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        check_width(self.arch, self.hidden)
        self.space  # noqa: B018 - parsing the latent checks it
        return self

    @property
    def space(self) -> LatentSpace:
        """The latent: ``LatentSpace.parse(latent, latent_dim, groups, prior)``."""
        return LatentSpace.parse(self.latent, self.latent_dim, self.groups, self.prior)

    def capacities(self, step: int) -> dict[str, float]:
        """Block name -> its capacity C(t) = C_max min(1, t / steps) at training step ``step``."""
        return {name: c_max * min(1.0, step / steps) for name, (c_max, steps) in self.capacity.items()}


def check_seed(seed: int, largest: int = MAX_SEED) -> None:
    """An ``InputError`` unless ``seed`` is an integer in [0, ``largest``]: 2^63 - 1 for torch, 2^32 - 1 where
    scikit-learn takes it too."""
    if not 0 <= seed <= largest:
        raise InputError(f"seed must be between 0 and 2^{largest.bit_length()} - 1 = {largest}, got {seed}", "seed")


def _positive_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


def _typed(name: str, value, hint):
    """``value`` if it has one of the types of ``hint`` (``int``, ``str | None``, ...), an int as a float where a
    float is declared; else an ``InputError``."""
    kinds = typing.get_args(hint) or (hint,)
    for kind in kinds:
        if kind is type(None) and value is None:
            return None
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool, dict) and isinstance(value, kind):
            return value
        if kind is str and isinstance(value, os.PathLike):
            return os.fspath(value)
    expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    raise InputError(f"{name} must be {expected}, got {value!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` where present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name} requested but CUDA is not available", "device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {name}: there are only {torch.cuda.device_count()} CUDA devices", "device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device mps requested but MPS is not available", "device")
    return device


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
def objective(terms: Terms, cfg: Config, step: int) -> torch.Tensor:
    """The loss minimised at ``step``: the negative ELBO, each block with a capacity (``cfg.capacity``) taking
    gamma |KL_block - C_block(t)| in place of its KL (Burgess et al. 2018; JointVAE, Dupont 2018), plus lambda
    times the consistency term when there is one (``cfg.consistency``) and beta times the marginal KL
    (``cfg.balance``)."""
    extra = [] if terms.consistency is None else [cfg.consistency * terms.consistency]
    if cfg.balance:
        extra.append(cfg.balance * terms.marginal_kl)
    extra += [cfg.capacity_gamma * (terms.kl_blocks[name] - c).abs() - terms.kl_blocks[name]
              for name, c in cfg.capacities(step).items()]
    return sum(extra, terms.loss)  # the loss itself when there is nothing to add (no kernel, no graph node)


def scaled(loss: torch.Tensor, share: float) -> torch.Tensor:
    """``loss`` times this rank's ``share`` (``Ranks.share``): the loss itself for one process."""
    return loss if share == 1 else loss * share


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


def check_estimand(space: LatentSpace, estimator: Estimator) -> None:
    """Refuse a registered estimator other than ``reparam`` where what it is given (``Family.estimand``) is
    Gaussian: a latent without a discrete block, or the mixture prior (which sums its categorical out)."""
    gaussian = space.prior == "mixture" or all(block.num_states is None for block in space.blocks)
    if gaussian and estimator.function in ESTIMATORS.values() and estimator.name != "reparam":
        given = "prior mixture sums its categorical out" if space.prior == "mixture" else \
            f"the latent {space} has no discrete block"
        raise InputError(f"estimator {estimator.name} is for discrete latents, and {given}: train the Gaussian "
                         "with estimator reparam", "estimator", "prior")


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

    def load_state_dict(self, ckpt: dict, rng: bool = True) -> None:
        """Continue from ``ckpt`` (checked first: ``check_state``); with ``rng`` (rank 0 of several: only it) also
        torch's random state."""
        check_state(ckpt, self.model)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.shuffle.set_state(ckpt["shuffle"])
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
    params = [weights[name] for name, _ in model.named_parameters()]
    optimizer = ckpt["optimizer"]
    groups, state = optimizer.get("param_groups"), optimizer.get("state")
    if set(optimizer) != {"state", "param_groups"} or not isinstance(state, dict) or not isinstance(groups, list) \
            or len(groups) != 1 or not isinstance(groups[0], dict):
        refuse("its optimizer state is not Adam's {state, param_groups} with one group")
    settings = adam([torch.zeros(1, requires_grad=True)], 1.0).param_groups[0]
    group = groups[0]
    wrong = sorted(map(str, set(settings) ^ set(group))) + [k for k, v in group.items() if k in settings and k not in (
        "params", "lr") and not (type(v) is type(settings[k]) and v == settings[k])]
    indices = group.get("params")
    if wrong or not (isinstance(indices, list) and all(type(i) is int for i in indices)
                     and indices == list(range(len(params)))) or not _positive_finite(group.get("lr")):
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


def model_for(cfg: Config, data: Dataset) -> VAE:
    return build_model(cfg.arch, data.x_train.shape[1:], cfg.space, likelihood=cfg.likelihood, init=cfg.init,
                       hidden=cfg.hidden)


def train(cfg: Config, resume: bool = False, progress: bool = True, data: Dataset | None = None,
          estimator=None, callbacks=None) -> TrainState:
    """Train (or continue) the run in ``cfg.out`` while holding its lock.

    Args:
        cfg: the configuration, checked first (``Config.check``); written to ``config.json``.
        resume: continue the checkpoint in ``cfg.out`` bit for bit (only the ``RESUMABLE`` settings may differ).
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
        Diverged: at the first non-finite loss or gradient (looked for every ``speed.CHECK_EVERY`` steps and before
            each checkpoint), naming its step; the checkpoint of the last finished epoch is left as it was.
    """
    cfg.check()
    estimator = estimator_for(cfg, estimator)
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
        state = TrainState(model, adam(model.parameters(), cfg.lr), torch.Generator().manual_seed(cfg.seed))
        if ckpt is not None:
            state.load_state_dict(ckpt, ranks.main)
            for group in state.optimizer.param_groups:
                group["lr"] = cfg.lr
        check_estimator(model, x_train[:2], estimator)
        if cfg.consistency:  # fails here, before training, unless the data are images (torch's stream untouched)
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
        guard = DivergenceGuard(device, cfg.lr, cfg.out, agree=ranks.any)
        hooks.on_train_start(state, cfg)
        for epoch in range(state.epoch, cfg.epochs):
            model.train()
            ranks.seed_stream(cfg.seed, epoch)
            start, sums = time.perf_counter(), 0.0
            order = torch.randperm(n, generator=state.shuffle).to(device)
            hooks.on_epoch_start(state, math.ceil(n / cfg.batch_size))
            for i in range(0, n - ranks.world + 1, cfg.batch_size):  # (not a last batch with fewer rows than ranks)
                rows, share = ranks.share(order[i:i + cfg.batch_size])
                images = x_train.index_select(0, rows)
                x = binarize(images, cfg.binarize)
                view = binarize(random_affine(images, **cfg.augment), cfg.binarize) if cfg.consistency else None
                def loss_of(terms, step=state.step, share=share):
                    return scaled(objective(terms, cfg, step), share)
                terms, health = train_step(model, state.optimizer, forward, x, estimator_options(cfg, state.step),
                                           loss_of, view)
                state.step += 1
                values = terms.values()  # neg_elbo, expected_ll, kl (a hybrid's kl per block): summed on the device
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


def forward_fn(model: VAE, estimator: Estimator, cfg: Config):
    """``forward(x, options, view=None)``: the model's ``Terms`` on the batch ``x`` (and its ``view``) with
    ``estimator(**options)``, the networks in ``cfg.precision``; compiled with ``cfg.compile``."""
    device = next(model.parameters()).device

    def forward(x: torch.Tensor, options: dict, view: torch.Tensor | None = None):
        with autocast(cfg.precision, device):
            return model(x, estimator, view, **options)
    return compiled(forward) if cfg.compile else forward


def epoch_row(state: TrainState, cfg: Config, train_terms: dict, x_test: torch.Tensor,
              x_fixed: torch.Tensor, estimator: Estimator) -> dict:
    """The metrics of the epoch ``state.epoch`` just finished (a row of ``metrics.csv``): the train terms averaged
    over its steps, the test terms of the model as it is now and, every ``cfg.grad_var_every`` epochs, the gradient
    variance on the fixed mini-batch ``x_fixed``. Leaves the model in eval mode."""
    state.model.eval()
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


def differing(cfg: Config, saved: Config) -> list[str]:
    """The settings of ``cfg`` that differ from ``saved`` and may not change when a run is resumed
    (``RESUMABLE``)."""
    return [k for k in dataclasses.asdict(saved) if k not in RESUMABLE and getattr(cfg, k) != getattr(saved, k)]


def check_memory(cfg: Config, data: Dataset, device: torch.device, estimator: Estimator) -> None:
    """Refuse a configuration whose training step with ``estimator`` cannot fit in the device's free memory (see
    :mod:`discvae.memory`), with both figures."""
    need = step_bytes(lambda: model_for(cfg, data), data.x_train.shape[1:], min(cfg.batch_size, len(data.x_train)),
                      lambda model, x: model(x, estimator))
    check_fits(need, device, "a training step", "lower batch_size, num_samples or latent_dim", "batch_size",
               "num_samples", "latent_dim")


def threads_for(cfg: Config, data: Dataset, device: torch.device, estimator: Estimator) -> int:
    """The intra-op threads to train with (``speed.choose_threads``): ``cfg.threads`` if set, else one for a step
    whose forward pass needs fewer than ``speed.SMALL_STEP_FLOPS`` (counted on the ``meta`` device), else torch's
    choice; never more than the cores this process may use. On a GPU, torch's setting as it is."""
    if device.type != "cpu" and cfg.threads is None:
        return torch.get_num_threads()
    flops = None if cfg.threads is not None else step_flops(
        lambda: model_for(cfg, data), data.x_train.shape[1:], min(cfg.batch_size, len(data.x_train)),
        lambda model, x: model(x, estimator))
    return choose_threads(cfg.threads, flops)


def load_run(run_dir, device: str = "cpu", ckpt: dict | None = None) -> tuple[Config, VAE, Dataset]:
    """A finished or running run, as saved, checked: its ``config.json`` agrees with its checkpoint's configuration
    (``RESUMABLE`` settings aside) and the checkpoint fits the model (``check_state``).

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
