"""Gradient estimators of the expected log-likelihood E_q[f(z)], f(z) = ln p(x|z).

Each estimator is one pure function ``estimator(q, f, num_samples=1, **options) -> surrogate`` of a latent
distribution ``q`` (a family of :mod:`discvae.distributions`, or a ``torch.distributions`` ``Bernoulli``,
``OneHotCategorical`` or ``Normal``, converted by :func:`~discvae.distributions.as_family`; gradients flow to the
encoder through its parameters) and a black box ``f``: ``f(z)`` takes ``z`` of shape ``[M, B', dim]`` (``B'`` the
batch size, or 1 for a state shared by the batch) and returns ``[M, B]``. The returned ``surrogate`` has shape
``[B]``: its *value* is the estimate of E_q[f(z)] and its *gradient* is the estimated gradient. Nothing else knows
which estimator runs: the model and the training loop take any such function, e.g. a user's own.

``make_estimator(name_or_function, **options)`` resolves a registered name (``ESTIMATORS``) once and checks the
options against the function's signature, returning an :class:`Estimator` value ``(q, f) -> surrogate``.

Unbiased for grad E_q[f]: ``importance`` (any baseline), ``rloo``, ``disarm``, ``exact``. ``vimco`` is unbiased for
the gradient of a different objective, the M-sample IWAE bound. ``gumbel``, ``st-gumbel`` and ``straight-through``
are biased. ``num_samples`` M counts decoder evaluations per data point (``disarm``: M / 2 antithetic pairs;
``exact`` ignores it and decodes each of the S latent states once per batch).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .distributions import Bernoulli, as_family
from .errors import InputError

BASELINES = ("none", "mean", "loo")


def _baseline(fz: torch.Tensor, kind: str) -> torch.Tensor | float:
    """A control variate b_mb for f(z_mb) that is independent of z_mb, so E[(f - b) grad w] = E[f grad w].

    ``loo``: the mean of f over the other M - 1 samples of the same data point; ``mean``: the mean over every other
    (sample, data point) pair of the batch, or none (b = 0) for a lone sample, which has no other.
    """
    m, n = fz.shape[0], fz.numel()
    if kind == "none":
        return 0.0
    if kind == "loo":
        if m < 2:
            raise InputError("the loo baseline needs num_samples of at least 2", "num_samples")
        return (fz.sum(0, keepdim=True) - fz) / (m - 1)
    if kind == "mean":
        return (fz.sum() - fz) / (n - 1) if n > 1 else 0.0
    raise InputError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def _posterior_as_family(estimator: Callable) -> Callable:
    """``estimator`` taking its posterior ``q`` as a ``torch.distributions`` object too (see ``as_family``)."""
    @functools.wraps(estimator)
    def wrapped(q, f, *args, **options):
        return estimator(as_family(q), f, *args, **options)
    return wrapped


@_posterior_as_family
def importance(q, f, num_samples: int = 1, proposal: str | torch.Tensor | None = None,
               baseline: str = "none") -> torch.Tensor:
    """Importance sampling from q_I (paper eq. 14-18).

    z_m ~ q_I, w_m = q(z_m|x) / q_I(z_m) computed in log space, estimate (1/M) sum_m w_m f(z_m).
    Gradient: decoder (1/M) sum_m w_m grad f(z_m) (eq. 18), encoder (1/M) sum_m f(z_m) grad w_m (eq. 17).
    ``proposal=None`` (or ``"posterior"``) takes xi = eta without gradient, so w_m = 1 and the encoder gradient is
    the score function f(z_m) (z_m - q)^T d eta (eq. 23, 29); otherwise ``proposal`` holds fixed natural
    parameters xi (eq. 20, 28), broadcast over the batch; ``"uniform"`` is xi = 0. ``baseline`` subtracts a
    control variate b from f in the encoder term only, (f(z_m) - b) grad w_m, which keeps the estimate unbiased
    (E_{q_I}[grad w] = grad sum_z q(z|x) = 0); the paper's estimator is ``baseline="none"``.
    """
    if proposal is None or proposal == "posterior":
        q_i = q
    elif proposal == "uniform":
        q_i = q.proposal(torch.zeros_like(q.logits))
    elif isinstance(proposal, str):
        raise InputError(f"unknown proposal {proposal!r}; use posterior, uniform or a tensor of natural parameters")
    else:
        q_i = q.proposal(torch.as_tensor(proposal, dtype=q.logits.dtype, device=q.logits.device))
    z = q_i.sample(num_samples)
    w = (q.log_prob(z) - q_i.log_prob(z).detach()).exp()
    fz = f(z)
    advantage = fz.detach() - _baseline(fz.detach(), baseline)
    return (w.detach() * fz + advantage * (w - w.detach())).mean(0)


@_posterior_as_family
def reparam(q, f, num_samples: int = 1) -> torch.Tensor:
    """Reparameterised sampling z = mu + sigma eps (eq. 8-11), for the Gaussian family."""
    if not hasattr(q, "rsample"):
        raise InputError("the reparam estimator needs a reparameterisable (gaussian) latent")
    return f(q.rsample(num_samples)).mean(0)


def _need_samples(name: str, num_samples: int, pairs: bool = False) -> None:
    if pairs and (num_samples < 2 or num_samples % 2):
        raise InputError(f"{name} needs an even num_samples (2 per antithetic pair), got {num_samples}", "num_samples")
    if num_samples < 2:
        raise InputError(f"{name} needs num_samples of at least 2, got {num_samples}", "num_samples")


@_posterior_as_family
def rloo(q, f, num_samples: int = 2) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019): the score function with baseline b_m = mean_{j != m} f(z_j),
    (1/M) sum_m (f(z_m) - b_m) grad ln q(z_m), z_m ~ q; unbiased, M >= 2. Same as ``importance(baseline="loo")``."""
    _need_samples("rloo", num_samples)
    return importance(q, f, num_samples, baseline="loo")


@_posterior_as_family
def vimco(q, f, num_samples: int = 2) -> torch.Tensor:
    """VIMCO (Mnih & Rezende 2016) for the M-sample IWAE bound L = ln (1/M) sum_m w_m, z_m ~ q,
    ln w_m = f(z_m) + ln p(z_m) - ln q(z_m).

    Gradient: sum_m w~_m grad ln w_m + sum_m (L - L_-m) grad ln q(z_m), w~ = softmax(ln w), where L_-m replaces
    ln w_m by the mean of the other ln w_j (the per-sample leave-one-out baseline). Returns L + KL(q || p): the
    model's loss KL - surrogate is then -L, so training maximises the IWAE bound (reported as "-ELBO"); unbiased
    for grad L, not for grad E_q[f]. M >= 2.
    """
    _need_samples("vimco", num_samples)
    m = num_samples
    z = q.sample(m)
    log_q = q.log_prob(z)
    log_w = f(z) + q.prior_log_prob(z) - log_q  # [M, B], gradient through f and ln q (z fixed)
    bound = torch.logsumexp(log_w, 0) - math.log(m)
    lw = log_w.detach()
    loo_mean = (lw.sum(0, keepdim=True) - lw) / (m - 1)  # [M, B]
    eye = torch.eye(m, dtype=torch.bool, device=lw.device)[:, :, None]
    swapped = torch.where(eye, loo_mean[:, None, :], lw[None, :, :])  # row m: ln w with entry m replaced
    bound_loo = torch.logsumexp(swapped, 1) - math.log(m)  # [M, B]
    score = ((bound.detach() - bound_loo) * (log_q - log_q.detach())).sum(0)
    return bound + score + q.kl_to_prior()


@_posterior_as_family
def disarm(q, f, num_samples: int = 2) -> torch.Tensor:
    """DisARM (Dong, Mnih & Tucker 2020) for Bernoulli latents: M / 2 antithetic pairs b = [u < sigma(eta)],
    b' = [1 - u < sigma(eta)] sharing u ~ U(0, 1)^c. Encoder gradient per pair and bit
    g_i = 1/2 (f(b) - f(b')) (b_i - b'_i) sigma(|eta_i|) d eta_i; value and decoder gradient (f(b) + f(b')) / 2.
    Unbiased; M even."""
    if not isinstance(q, Bernoulli):
        raise InputError("disarm needs a bernoulli latent (use rloo or exact for categoricals)")
    _need_samples("disarm", num_samples, pairs=True)
    with torch.no_grad():
        p = q.probs.expand(num_samples // 2, *q.logits.shape)
        u = torch.rand_like(p)
        b, b_anti = (u < p).to(p.dtype), (1 - u < p).to(p.dtype)
    fb, fa = f(torch.cat([b, b_anti])).chunk(2)
    eta = q.logits
    direction = ((b - b_anti) * torch.sigmoid(eta.abs()).detach() * (eta - eta.detach())).sum(-1)
    return (0.5 * (fb + fa) + 0.5 * (fb - fa).detach() * direction).mean(0)


def _relaxed(q, num_samples: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not getattr(q, "discrete", False):
        raise InputError("relaxed estimators need a bernoulli or categorical latent")
    if not tau > 0:
        raise InputError(f"the temperature tau must be positive, got {tau}", "tau")
    return q.relaxed_sample(num_samples, tau)


@_posterior_as_family
def gumbel(q, f, num_samples: int = 1, tau: float = 1.0) -> torch.Tensor:
    """Concrete / Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017): (1/M) sum_m f(z~_m) with
    z~_m = softmax((eta + g_m) / tau) per group (binary concrete sigmoid((eta + L) / tau) for bits), gradients
    pathwise. BIASED: it estimates the relaxed objective E[f(z~)], whose value and gradient reach E_q[f(z)] only as
    tau -> 0, where the gradient's variance grows without bound."""
    soft, _ = _relaxed(q, num_samples, tau)
    return f(soft).mean(0)


@_posterior_as_family
def st_gumbel(q, f, num_samples: int = 1, tau: float = 1.0) -> torch.Tensor:
    """Straight-through Gumbel-softmax (Jang et al. 2017): the forward pass decodes the hard sample z = argmax
    (an exact sample of q, so the value is unbiased), the backward pass the relaxed one: z + z~ - sg(z~). The
    gradient is BIASED for every tau."""
    soft, hard = _relaxed(q, num_samples, tau)
    return f(hard + soft - soft.detach()).mean(0)


@_posterior_as_family
def straight_through(q, f, num_samples: int = 1) -> torch.Tensor:
    """Straight-through (Bengio et al. 2013; as in VQ-VAE): decode z ~ q, backpropagate as if z were its mean:
    z + E_q[z] - sg(E_q[z]), i.e. grad = (df/dz)(z) dE_q[z]/d eta. Value unbiased, gradient BIASED."""
    if not getattr(q, "discrete", False):
        raise InputError("straight-through needs a bernoulli or categorical latent")
    mean = q.mean
    return f(q.sample(num_samples) + mean - mean.detach()).mean(0)


EXACT_MAX_STATES = 4096


@_posterior_as_family
def exact(q, f, num_samples: int = 1) -> torch.Tensor:
    """sum_z q(z|x) f(z) over every latent state z (S = c^G for categoricals, 2^c for bits; at most
    EXACT_MAX_STATES = 4096): each state is decoded once for the whole batch (f sees z of shape [S, 1, dim]).
    Exact value and gradient, zero variance; ``num_samples`` is ignored."""
    if not getattr(q, "discrete", False):
        raise InputError("exact needs a bernoulli or categorical latent")
    if q.num_states > EXACT_MAX_STATES:
        raise InputError(f"exact would sum over {q.num_states:.3g} latent states; the limit is {EXACT_MAX_STATES} "
                         "(e.g. one categorical of up to 4096 classes, or at most 12 bits)")
    states = q.enumerate()[:, None, :]  # [S, 1, dim]
    return (q.log_prob(states).exp() * f(states)).sum(0)


ESTIMATORS = {"importance": importance, "reparam": reparam, "rloo": rloo, "vimco": vimco, "disarm": disarm,
              "gumbel": gumbel, "st-gumbel": st_gumbel, "straight-through": straight_through, "exact": exact}
"""The registered estimators by name (``--estimator NAME``, ``make_estimator("NAME")``), each a function
``estimator(q, f, **options)``."""


@dataclass(frozen=True)
class Estimator:
    """An estimator function with options bound: ``Estimator(q, f, **more)`` is ``function(q, f, **options,
    **more)``, ``more`` overriding ``options`` (e.g. an annealed temperature). ``name`` is the registered name of
    ``function`` or its qualified name. Build it with :func:`make_estimator`, which checks the options."""

    name: str
    function: Callable
    options: dict = field(default_factory=dict)

    def __call__(self, q, f, **more) -> torch.Tensor:
        return self.function(q, f, **{**self.options, **more})

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def estimator_name(function: Callable) -> str:
    """The name ``function`` is registered under in ``ESTIMATORS``, else ``module.qualname`` (for a callable object,
    of its class)."""
    registered = [name for name, fn in ESTIMATORS.items() if fn is function]
    named = function if hasattr(function, "__qualname__") else type(function)
    return registered[0] if registered else f"{named.__module__}.{named.__qualname__}"


def make_estimator(estimator: str | Callable, **options) -> Estimator:
    """An estimator resolved once, its options bound after checking them against the function's signature.

    Option *values* are checked by the estimator when it runs (e.g. ``num_samples`` of at least 2 for rloo).

    Args:
        estimator: a name of ``ESTIMATORS``, a function ``estimator(q, f, **options) -> surrogate [B]`` (the
            contract of this module), or an :class:`Estimator` (its options updated by ``options``).
        **options: keyword arguments of the function, e.g. ``num_samples=4``.

    Returns:
        The :class:`Estimator`: a callable ``(q, f, **more)`` with ``name``, ``function`` and ``options``.

    Raises:
        InputError: an unknown name, something not callable, or an option the function does not take.
    """
    if isinstance(estimator, Estimator):
        return make_estimator(estimator.function, **{**estimator.options, **options})
    function = _resolve(estimator)
    name = estimator_name(function)
    check_options(name, function, options)
    return Estimator(name, function, options)


def _resolve(estimator: str | Callable) -> Callable:
    """The function registered as ``estimator``, or ``estimator`` itself if it is callable; else an InputError."""
    if isinstance(estimator, str):
        if estimator not in ESTIMATORS:
            raise InputError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        return ESTIMATORS[estimator]
    if not callable(estimator):
        raise InputError(f"an estimator is a registered name or a function estimator(q, f, **options), not "
                         f"{estimator!r}")
    return estimator


def check_options(name: str, function: Callable, options: dict) -> None:
    """InputError unless ``function(q, f, **options)`` binds (``inspect.Signature.bind``): an option the function
    does not take is named with those it takes, a required one left out by Python's own message."""
    signature = inspect.signature(function)
    try:
        signature.bind(None, None, **options)
    except TypeError as err:
        takes = [p.name for p in list(signature.parameters.values())[2:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in options if k not in takes]
        if unknown:
            raise InputError(f"estimator {name} takes no option {unknown[0]!r} (it takes "
                             f"{', '.join(takes) or 'none'})", unknown[0], *takes) from None
        raise InputError(f"estimator {name}: {err}") from None
