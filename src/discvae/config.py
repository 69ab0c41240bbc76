"""The settings of a run: ``Config``, plain data saved as ``config.json``, each field with its command-line flag and
its section of ``discvae train --help`` (data, model, latent and prior, objective, optimiser, runtime); its checks,
what may change on resume (``RESUMABLE``), the seed's range and the device a name means.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import MISSING, dataclass

import torch

from .augmentation import AUGMENT
from .criteria import CRITERIA
from .data import DATASETS
from .errors import InputError, non_negative_finite, positive_finite, positive_int
from .estimators import ESTIMATORS
from .flags import Flag, documented, setting
from .latents import DEFAULT_SIZE, FAMILIES, PRIORS, LatentSpace
from .likelihoods import BINARIZE, LIKELIHOODS
from .models import ARCHS, INITS, architecture_options
from .speed import PRECISIONS, check_precision
from .surrogates import BASELINES

# what may change when a run is resumed (a smaller lr continues a run that diverged)
RESUMABLE = ("epochs", "lr", "estimator_lr", "device", "data_dir", "download", "out", "grad_var_every",
             "grad_var_repeats", "precision", "compile", "threads")
MAX_SEED = 2**63 - 1
SKLEARN_MAX_SEED = 2**32 - 1  # scikit-learn's random_state
VIEWS = "the views t(x) of the consistency and contrastive terms: "  # the help of the view flags
CONTRASTIVE_TERMS = ("contrastive", "cluster_contrastive", "gaussian_contrastive")  # each with its weight and _tau


def capacity_flag(text: str) -> dict:
    """The value of ``--capacity BLOCK=CMAX:STEPS``: ``{BLOCK: [CMAX, STEPS]}``."""
    name, _, rest = text.partition("=")
    c_max, _, steps = rest.partition(":")
    try:
        return {name: [float(c_max), int(steps)]}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BLOCK=CMAX:STEPS, e.g. categorical=2.3:25000") from None


def estimator_option(text: str) -> dict:
    """The value of ``--estimator-option KEY=VALUE`` (and of each option of compare's ``NAME:KEY=VALUE``):
    ``{KEY: VALUE}``, ``-`` in KEY read as ``_``, VALUE an int, else a float, else the text itself."""
    key, sep, text_value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. hidden=50")
    for kind in (int, float):
        try:
            return {key.replace("-", "_"): kind(text_value)}
        except ValueError:
            pass
    return {key.replace("-", "_"): text_value}


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

    # -- data
    dataset: str = setting("mnist", Flag(f"{', '.join(DATASETS)} or a .npy/.npz file"), section="data")
    data_dir: str | None = setting(None, Flag("folder holding mnist/ and fashion-mnist/ (default $DISCVAE_DATA, "
                                              "else ~/.cache/discvae)"), section="data")
    download: bool = setting(False, Flag("fetch missing MNIST/Fashion-MNIST files"), section="data")
    binarize: str = setting("none", Flag("data binarisation", choices=BINARIZE), section="data")

    # -- model
    arch: str = setting("fc", Flag("Table I architecture", choices=ARCHS), section="model")
    hidden: int | None = setting(None, Flag("width of the hidden layers of the fc (default 1024) and nonlinear "
                                            "(default 200) architectures"), section="model")
    slope: float | None = setting(None, Flag("negative slope of the nonlinear architecture's LeakyReLU (default 0.2; "
                                             "the DisARM / RODEO code uses 0.3)"), section="model")
    init: str = setting("torch", Flag("weight initialisation: torch (PyTorch's default) or he (N(0, 2/fan_in), zero "
                                      "biases)", choices=INITS), section="model")
    likelihood: str = setting("bernoulli", Flag("p(x|z)", choices=list(LIKELIHOODS)), section="model")

    # -- latent and prior
    latent: str = setting("bernoulli", Flag(
        f"latent family: {', '.join(FAMILIES)} (sized by --latent-dim and --groups), or blocks with their sizes "
        "joined by +, e.g. categorical:10+gaussian:10, bernoulli:32+gaussian:8, categorical:10x20 (20 groups); a "
        "block without its size takes --latent-dim and --groups (bernoulli+gaussian:16)"),
        section="latent and prior")
    latent_dim: int | None = setting(None, Flag(f"bits, classes per group, or Gaussian dims (default {DEFAULT_SIZE})"),
                                     section="latent and prior")
    groups: int = setting(1, Flag("independent categorical groups"), section="latent and prior")
    prior: str = setting("standard", Flag(
        "p(z): standard (uniform classes and bits, N(0, I)); learned (the bits' and classes' probabilities "
        "learned, a factorised prior as in the ARM / DisARM benchmark; Gaussian blocks N(0, I)); or mixture, for a "
        "latent categorical:C+gaussian:K: "
        "p(y) p(z|y) = (1/C) N(z; mu_y, I) with learned means, the decoder reading z alone, y summed out exactly "
        "(GMVAE / VaDE clustering; train with --estimator reparam); or mixture-var, the same with learned variances, "
        "N(z; mu_y, diag sigma_y^2) (VaDE's prior)", choices=PRIORS), section="latent and prior")

    # -- objective
    estimator: str = setting("importance", Flag("gradient estimator", choices=list(ESTIMATORS)), section="objective")
    estimator_options: dict = setting(
        MISSING,
        Flag("samples of z per data point, M", type=int, key="num_samples"),
        Flag("importance proposal q_I: xi = eta (default, eq. 23/29) or uniform (xi = 0)",
             choices=("posterior", "uniform"), key="proposal"),
        Flag("control variate of the importance estimator: none (default, the paper), mean (over the rest of the "
             "batch) or loo (over the other M-1 samples)", choices=BASELINES, key="baseline"),
        Flag("temperature of gumbel / st-gumbel (default 1)", type=float, key="tau"),
        Flag("any other option of the estimator, KEY=VALUE, once per option (e.g. hidden=50: the width of relax's "
             "or rodeo's network; temperature=0.3: rebar's initial temperature); what compare's NAME:KEY=VALUE sets",
             type=estimator_option, metavar="KEY=VALUE", name="estimator_option"),
        factory=lambda: {"num_samples": 1}, section="objective")
    estimator_schedule: dict = setting(
        MISSING,
        Flag("anneal tau as max(END, START exp(-RATE step)) (Jang et al. 2017); overrides --tau", type=float,
             nargs=3, metavar=("START", "END", "RATE"), key="tau", name="tau_anneal"),
        factory=dict, section="objective")
    # block name -> [C_max nats, steps]: optimise gamma |KL_block - C(t)|, C(t) = C_max min(1, t / steps) (JointVAE)
    capacity: dict = setting(MISSING, Flag(
        "a capacity for a block of the latent (JointVAE): its KL term becomes gamma |KL - C(t)|, C rising linearly "
        "from 0 to CMAX nats over STEPS steps; repeat for several blocks", type=capacity_flag,
        metavar="BLOCK=CMAX:STEPS"), factory=dict, section="objective")
    capacity_gamma: float = setting(30.0, Flag("gamma of --capacity"), section="objective")
    consistency: float = setting(0.0, Flag(
        "weight lambda of a consistency term for the discrete blocks (IMSAT, Hu et al. 2017): the loss gains lambda "
        "E_x KL(q(y|x) || q(y|t(x))), q(y|x) held fixed, t a random shear, rotation, scaling and shift of the image "
        "(--shear, --rotation, --scale, --shift), so that codes and clusters do not follow slant or position; "
        "images only; 0: the ELBO alone"), section="objective")
    balance: float = setting(0.0, Flag(
        "weight beta of a balance term for the discrete blocks: the loss gains beta KL(q_bar(y) || p(y)), q_bar the "
        "batch's mean of q(y|x) -- the part of the KL term that measures how unevenly the codes or clusters are "
        "used (Hoffman & Johnson 2016; IMSAT's marginal entropy) -- against one cluster taking several classes; "
        "0: the ELBO alone"), section="objective")
    contrastive: float = setting(0.0, Flag(
        "weight of a contrastive term for the discrete blocks (InfoNCE; SimCLR, Chen et al. 2020): each image's code "
        "must agree with its view t(x)'s (--rotation, --shift, --scale, --shear, --flip) more than with the other "
        "images' views in the batch (under torchrun, in each process's share of it); the codes' expected agreement, "
        "over --contrastive-tau, as the logits; images only; 0: none"), section="objective")
    contrastive_tau: float = setting(0.2, Flag("temperature of --contrastive"), section="objective")
    cluster_contrastive: float = setting(0.0, Flag(
        "weight of a cluster-level contrastive term for the discrete blocks (Li et al. 2021, Contrastive "
        "Clustering): each cluster (or a bit's 1 or 0), as the column of its probabilities over the batch (under "
        "torchrun, each process's share of it), must pick the same images in the views t(x) and other images than "
        "the other clusters; the columns' cosine, over --cluster-contrastive-tau, as the logits; images only; "
        "0: none"), section="objective")
    cluster_contrastive_tau: float = setting(1.0, Flag("temperature of --cluster-contrastive"), section="objective")
    gaussian_contrastive: float = setting(0.0, Flag(
        "weight of a contrastive term for the Gaussian blocks (InfoNCE; SimCLR, and the instance-level head of Li et "
        "al. 2021, Contrastive Clustering): the posterior means of each image must point the way of its view "
        "t(x)'s more than of the other images' views in the batch (under torchrun, in each process's share of "
        "it); their cosine, over --gaussian-contrastive-tau, as the logits; images only; 0: none"),
        section="objective")
    gaussian_contrastive_tau: float = setting(0.5, Flag("temperature of --gaussian-contrastive"), section="objective")
    augment: dict = setting(
        MISSING,
        Flag(VIEWS + "largest rotation, degrees", type=float, key="rotation"),
        Flag(VIEWS + "largest shift, pixels", type=float, key="shift"),
        Flag(VIEWS + "largest relative change of size", type=float, key="scale"),
        Flag(VIEWS + "largest horizontal shear (slant), a point h pixels above the centre moving up to SHEAR h "
             "pixels sideways", type=float, key="shear"),
        Flag(VIEWS + "probability of a left-right mirror (for garments, not digits)", type=float, key="flip"),
        factory=lambda: dict(AUGMENT), section="objective")

    # -- optimiser
    epochs: int = setting(300, Flag("epochs to train"), section="optimiser")
    batch_size: int = setting(2048, Flag("images per step"), section="optimiser")
    lr: float = setting(1e-3, Flag("Adam learning rate"), section="optimiser")
    estimator_lr: float = setting(1e-3, Flag(
        "Adam learning rate of the estimator's own parameters, for an estimator that learns (nvil, rebar, relax, "
        "double-cv, rodeo)"), section="optimiser")

    # -- runtime
    seed: int = setting(0, Flag("fixes every random number"), section="runtime")
    keep_best: str | None = setting(None, Flag(
        "after every epoch score the codes by a criterion that uses no labels and keep the best epoch as the run "
        "OUT/best: neighbours (the retrieval mAP of training images with each image's nearest tenth of the "
        "training set in pixel space as its relevant items) or invariance (how much nearer the code of an image's "
        "random view t(x) is than another image's)", choices=CRITERIA), section="runtime")
    grad_var_every: int = setting(1, Flag("record gradient variance every N epochs (0: never)"), section="runtime")
    grad_var_repeats: int = setting(16, Flag("independent gradient estimates R for it"), section="runtime")
    device: str = setting("auto", Flag("auto, cpu, cuda, cuda:N or mps"), section="runtime")
    precision: str = setting("fp32", Flag("fp32, or bf16: the networks under autocast in bfloat16; weights, "
                                          "optimizer state and log-space sums in fp32; needs a GPU with bf16 or a "
                                          "CPU with AVX512-BF16 or AMX", choices=PRECISIONS), section="runtime")
    compile: bool = setting(False, Flag("torch.compile the training step (falls back to eager, with one line, "
                                        "where no compiler works or the estimator learns)"), section="runtime")
    threads: int | None = setting(None, Flag(
        "CPU threads for the networks' matrix products (default: chosen for the model's size -- one for a step too "
        "small to share, else torch's choice; never more than the cores this process may use); a runtime setting, "
        "free to change on resume"), section="runtime")
    out: str = setting("runs/mnist", Flag("run directory (default runs/DATASET-ARCH-LATENT-ESTIMATOR-sSEED)"),
                       section="runtime")

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
                               ("estimator_lr", 0 < self.estimator_lr < math.inf, "a positive finite number"),
                               ("capacity_gamma", 0 < self.capacity_gamma < math.inf, "a positive finite number"),
                               *((f"{term}_tau", 0 < getattr(self, f"{term}_tau") < math.inf,
                                  "a positive finite number") for term in CONTRASTIVE_TERMS)]:
            if not ok:
                raise InputError(f"{name} must be {need}, got {getattr(self, name)}", name)
        check_seed(self.seed)
        self.check_model()
        names = [block.name for block in self.space.blocks]
        for name, value in self.capacity.items():
            if name not in names:
                raise InputError(f"capacity of {name!r}: the latent {self.space} has the blocks {', '.join(names)}",
                                 "capacity")
            if not (isinstance(value, list) and len(value) == 2 and non_negative_finite(value[0])
                    and positive_int(value[1])):
                raise InputError(f"the capacity of {name} must be [C_max >= 0 nats, steps >= 1], got {value!r}",
                                 "capacity")
        for name, discrete in (("consistency", True), ("balance", True), ("contrastive", True),
                               ("cluster_contrastive", True), ("gaussian_contrastive", False)):
            if not 0 <= getattr(self, name) < math.inf:
                raise InputError(f"{name} must be a finite number >= 0, got {getattr(self, name)}", name)
            if getattr(self, name) and not any(block.family.discrete == discrete for block in self.space.blocks):
                kind = "discrete" if discrete else "Gaussian"
                raise InputError(f"{name} needs a latent with a {kind} block, not {self.space}", name)
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
            if not non_negative_finite(value):
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}", name)
        for name, limit, need in (("scale", self.augment.get("scale", 0) < 1, "below 1 (sizes 1 +- scale)"),
                                  ("flip", self.augment.get("flip", 0) <= 1, "a probability, at most 1")):
            if not limit:
                raise InputError(f"{name} must be {need}, got {self.augment[name]}", name)
        if self.grad_var_every < 0 or self.grad_var_repeats < 2:
            raise InputError("grad_var_every must be >= 0 (0: never) and grad_var_repeats >= 2", "grad_var_every",
                             "grad_var_repeats")
        num_samples = self.estimator_options.get("num_samples", 1)
        if not positive_int(num_samples):
            raise InputError(f"num_samples must be an integer of at least 1, got {num_samples!r}", "num_samples")
        if "tau" in self.estimator_options and not positive_finite(self.estimator_options["tau"]):
            raise InputError(f"tau must be a positive finite number, got {self.estimator_options['tau']!r}", "tau")
        for name, value in self.estimator_schedule.items():
            if not (isinstance(value, list) and len(value) == 3 and all(map(non_negative_finite, value))
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
        architecture_options(self.arch, self.hidden, self.slope)
        self.space  # noqa: B018 - parsing the latent checks it
        return self

    @property
    def space(self) -> LatentSpace:
        """The latent: ``LatentSpace.parse(latent, latent_dim, groups, prior)``."""
        return LatentSpace.parse(self.latent, self.latent_dim, self.groups, self.prior)

    @property
    def views(self) -> bool:
        """Whether training draws a view t(x) of each batch: a consistency or contrastive term weighs it."""
        return bool(self.consistency or self.contrastive_taus())

    def contrastive_taus(self) -> dict[str, float]:
        """The contrastive terms that weigh (``Terms``' method of each name), each with its temperature."""
        return {term: getattr(self, f"{term}_tau") for term in CONTRASTIVE_TERMS if getattr(self, term)}

    def capacities(self, step: int) -> dict[str, float]:
        """Block name -> its capacity C(t) = C_max min(1, t / steps) at training step ``step``."""
        return {name: c_max * min(1.0, step / steps) for name, (c_max, steps) in self.capacity.items()}


def check_seed(seed: int, largest: int = MAX_SEED) -> None:
    """An ``InputError`` unless ``seed`` is an integer in [0, ``largest``]: 2^63 - 1 for torch, 2^32 - 1 where
    scikit-learn takes it too."""
    if not 0 <= seed <= largest:
        raise InputError(f"seed must be between 0 and 2^{largest.bit_length()} - 1 = {largest}, got {seed}", "seed")


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


def differing(cfg: Config, saved: Config) -> list[str]:
    """The settings of ``cfg`` that differ from ``saved`` and may not change when a run is resumed
    (``RESUMABLE``)."""
    return [k for k in dataclasses.asdict(saved) if k not in RESUMABLE and getattr(cfg, k) != getattr(saved, k)]
