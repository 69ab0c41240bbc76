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

Unbiased for grad E_q[f]: ``importance`` (any baseline), ``rloo``, ``disarm``, ``double-cv``, ``rodeo``, ``exact``.
``vimco`` is unbiased for the gradient of a different objective, the M-sample IWAE bound. ``gumbel``, ``st-gumbel``
and ``straight-through`` are biased. ``num_samples`` M counts decoder evaluations per data point (``disarm``: M / 2
antithetic pairs; ``double-cv`` and ``rodeo`` add one backward pass for grad_z f at their M samples; ``exact``
ignores it and decodes each of the S latent states once per batch).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .distributions import Bernoulli, as_family, sampling
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


def _need_bits(name: str, q) -> None:
    if not isinstance(q, Bernoulli):
        raise InputError(f"{name} needs a bernoulli latent (use rloo or exact for categoricals)")


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
    _need_bits("disarm", q)
    _need_samples("disarm", num_samples, pairs=True)
    with torch.no_grad():
        p = q.probs.expand(num_samples // 2, *q.logits.shape)
        with sampling():
            u = torch.rand_like(p)
        b, b_anti = (u < p).to(p.dtype), (1 - u < p).to(p.dtype)
    fb, fa = f(torch.cat([b, b_anti])).chunk(2)
    eta = q.logits
    direction = ((b - b_anti) * torch.sigmoid(eta.abs()).detach() * (eta - eta.detach())).sum(-1)
    return (0.5 * (fb + fa) + 0.5 * (fb - fa).detach() * direction).mean(0)


def _taylor_samples(q, f, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z_k ~ q for k = 1..K, f(z_k) ``[K, B]`` and g_k = grad_z f(z_k) ``[K, B, dim]``, the gradient of f's
    continuous extension (the decoder takes real z): K evaluations of f and one backward pass, no more."""
    z = q.sample(num_samples).requires_grad_()
    with torch.enable_grad():  # under no_grad too: the gradients are part of the estimate
        fz = f(z)
        g, = torch.autograd.grad(fz.sum(), z, retain_graph=True)
    return z.detach(), fz, g


def _loo(v: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(1/K) sum_k (v_k - mean_{j != k} v_j) score_k for ``v`` ``[K, B]``, ``score`` ``[K, B, dim]``: ``[B, dim]``."""
    return ((v - _baseline(v, "loo"))[..., None] * score).mean(0)


def _fitted(estimate: torch.Tensor, controls: list[torch.Tensor]) -> torch.Tensor:
    """estimate_b + sum_j a_bj control_bj (all ``[B, dim]``, the controls of mean zero), the coefficients a_b of data
    point b minimising sum_{b' != b} |estimate_b' + sum_j a_bj control_b'j|^2 (least squares by pseudo-inverse).
    a_b does not depend on b's own samples, so every control keeps mean zero and the sum stays unbiased; a batch of
    one has a = 0. (The papers instead learn the coefficients online by SGD on the estimate's squared norm.)"""
    c = torch.stack(controls, 1)  # [B, J, dim]
    gram, cross = c @ c.transpose(1, 2), c @ estimate[..., None]  # [B, J, J], [B, J, 1]
    a = -torch.linalg.pinv(gram.sum(0) - gram) @ (cross.sum(0) - cross)
    return estimate + (a * c).sum(1)


def _logit_surrogate(q, fz: torch.Tensor, grad_eta: torch.Tensor) -> torch.Tensor:
    """Value (1/K) sum_k f(z_k) (its gradient the decoder's); its gradient w.r.t. the logits eta is ``grad_eta``."""
    eta = q.logits
    return fz.mean(0) + (grad_eta.detach() * (eta - eta.detach())).sum(-1)


@_posterior_as_family
def double_cv(q, f, num_samples: int = 2) -> torch.Tensor:
    """Double control variates (Titsias & Shi 2022) for Bernoulli latents: RLOO whose baseline carries a second
    control variate, the first-order Taylor expansion of f around the other samples.

    z_k ~ q, s_k = z_k - sigma(eta) = d ln q(z_k) / d eta, g_k = grad_z f(z_k), gbar_-k = mean_{j != k} g_j,
    c_k = gbar_-k . s_k. Encoder gradient w.r.t. eta:
    (1/K) sum_k [f_k + a c_k - mean_{j != k} (f_j + a c_j)] s_k - a sigma(eta) sigma(-eta) gbar,
    gbar = mean_k g_k: the last term is the exact mean of the a-terms (E[c_k s_k | z_-k] = Cov(z) gbar_-k; gbar_-j
    is free of z_j, so E[c_j | z_-j] = 0). Unbiased for any a; a is fitted per data point on the batch's others
    (``_fitted``), where the paper learns it by SGD (the authors' ``double_cv``, github.com/thjashin/rodeo). K =
    ``num_samples`` >= 2 evaluations of f plus one backward pass for the K gradients (f must be differentiable in
    z)."""
    _need_bits("double-cv", q)
    _need_samples("double-cv", num_samples)
    z, fz, g = _taylor_samples(q, f, num_samples)
    s, fd = z - q.probs.detach(), fz.detach()
    c = (_baseline(g, "loo") * s).sum(-1)
    variance = (torch.sigmoid(q.logits) * torch.sigmoid(-q.logits)).detach()
    control = _loo(c, s) - variance * g.mean(0)
    return _logit_surrogate(q, fz, _fitted(_loo(fd, s), [control]))


def gibbs_stein_linear(q, z: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gibbs Stein operator of Bernoulli q (Shi et al. 2022), (A u)(x) = (1/D) sum_i q(not x_i) [u(x^(i)) - u(x)]
    with x^(i) = x with bit i flipped and q(not x_i) = sigma((1 - 2 x_i) eta_i), at ``z`` ``[..., D]`` for the linear
    h(y) = gamma . (y - sigma(eta)) (``gamma`` ``[..., D]``) and for H = h s, s(y) = y - sigma(eta). As
    u(x^(i)) - u(x) = (1 - 2 x_i) d_i u and q(not x_i) (1 - 2 x_i) = -s_i: (A h)(z) = -(1/D) h(z) and
    (A H)(z) = (1/D) [q(not z) gamma - 2 h(z) s(z)], ``[...]`` and ``[..., D]``; both have mean 0 under q."""
    eta = q.logits.detach()
    s = z - torch.sigmoid(eta)
    h = (gamma * s).sum(-1)
    return -h / z.shape[-1], (torch.sigmoid((1 - 2 * z) * eta) * gamma - 2 * h[..., None] * s) / z.shape[-1]


@_posterior_as_family
def rodeo(q, f, num_samples: int = 2) -> torch.Tensor:
    """RODEO (Shi, Zhou, Hwang, Titsias & Mackey 2022) for Bernoulli latents: RLOO with two control variates made by
    the Gibbs Stein operator A (``gibbs_stein_linear``) from surrogates of f that cost no evaluation of f.

    z_k ~ q, s_k = z_k - sigma(eta), g_j = grad_z f(z_j); the surrogate of f for sample k is the mean first-order
    Taylor expansion around the others, fhat_k(y) = mean_{j != k} [f_j + g_j . (y - z_j)], taken as
    h_k(y) = fhat_k(y) - fhat_k(sigma(eta)) = gbar_-k . (y - sigma(eta)), and H_k = h_k s. Encoder gradient w.r.t.
    eta: (1/K) sum_k ([f_k - mean_{j != k} (f_j + a (A h_j)(z_j))] s_k + b (A H_k)(z_k)). E (A u) = 0 under q for
    any u, and h_j, H_k are free of z_j, z_k, so it is unbiased for any a, b. The paper's h, H are a small network
    of the surrogate, trained online with a, b by SGD on the estimate's squared norm (the authors'
    ``discrete_stein_avg``, github.com/thjashin/rodeo, their K = 2 benchmark setting); this pure function keeps no
    state: h, H are the centred linear surrogate above and (a, b) are fitted per data point on the batch's others
    (``_fitted``). K = ``num_samples`` >= 2 evaluations of f plus one backward pass for the K gradients; the Stein
    operator needs no evaluation at the D neighbours (f must be differentiable in z)."""
    _need_bits("rodeo", q)
    _need_samples("rodeo", num_samples)
    z, fz, g = _taylor_samples(q, f, num_samples)
    s, fd = z - q.probs.detach(), fz.detach()
    a_h, a_hs = gibbs_stein_linear(q, z, _baseline(g, "loo"))
    controls = [-(_baseline(a_h, "loo")[..., None] * s).mean(0), a_hs.mean(0)]
    return _logit_surrogate(q, fz, _fitted(_loo(fd, s), controls))


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
              "double-cv": double_cv, "rodeo": rodeo, "gumbel": gumbel, "st-gumbel": st_gumbel,
              "straight-through": straight_through, "exact": exact}
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
