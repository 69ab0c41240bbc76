"""Gradient estimators of the expected log-likelihood E_q[f(z)], f(z) = ln p(x|z).

Each estimator is one pure function ``estimator(q, f, num_samples=1, **options) -> surrogate`` of a latent
distribution ``q`` (a family of :mod:`discvae.distributions`, or a ``torch.distributions`` ``Bernoulli``,
``OneHotCategorical`` or ``Normal``, converted by :func:`~discvae.distributions.as_family`; gradients flow to the
encoder through its parameters) and a black box ``f``: ``f(z)`` takes ``z`` of shape ``[M, B', dim]`` (``B'`` the
batch size, or 1 for a state shared by the batch) and returns ``[M, B]``. The returned ``surrogate`` has shape
``[B]``: its *value* is the estimate of E_q[f(z)] and its *gradient* is the estimated gradient. Nothing else knows
which estimator runs: the model and the training loop take any such function, e.g. a user's own.

``make_estimator(name_or_function, **options)`` resolves a registered name (``ESTIMATORS``) once and checks the
options against the function's signature, returning an :class:`Estimator` value ``(q, f) -> surrogate``. Estimators
that learn parameters of their own (NVIL's baseline, REBAR's and RELAX's control variates, the published double CV
and RODEO) are modules of :mod:`discvae.learned`, registered here too: ``make_estimator`` builds a fresh one.

Unbiased for grad E_q[f]: ``importance`` (any baseline), ``rloo``, ``arm``, ``arms``, ``disarm``, ``double-cv-ls``,
``rodeo-ls``, ``exact`` and the learned ``double-cv``, ``rodeo``, ``rebar``, ``relax`` (``nvil`` up to a positive
scale). ``vimco`` is unbiased for the gradient of a different objective, the M-sample IWAE bound; ``rws`` follows
reweighted wake-sleep's (the IWAE bound for the decoder, the inclusive KL for the encoder). ``gumbel``,
``st-gumbel`` and ``straight-through`` are biased. ``num_samples`` M counts decoder evaluations per data point
(``arm``, ``disarm``: M / 2 antithetic pairs; the ``-ls`` and learned control-variate estimators add one backward
pass for grad_z f at their M samples; ``rebar`` and ``relax`` take 3 evaluations per sample; ``exact`` ignores it
and decodes each of the S latent states once per batch).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .distributions import as_family, sampling
from .errors import InputError
from .learned import LEARNED
from .surrogates import logit_surrogate, loo_score, need_bits, need_samples, sample_baseline, taylor_samples


def unstackable(estimator: Callable) -> Callable:
    """Mark ``estimator`` as one that cannot run with stacked weights (``torch.func.vmap``: it takes gradients with
    respect to z, or draws its randomness in place): ``compare --stacked`` refuses it up front."""
    estimator.stackable = False
    return estimator


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
    advantage = fz.detach() - sample_baseline(fz.detach(), baseline)
    return (w.detach() * fz + advantage * (w - w.detach())).mean(0)


@_posterior_as_family
def reparam(q, f, num_samples: int = 1) -> torch.Tensor:
    """Reparameterised sampling z = mu + sigma eps (eq. 8-11), for the Gaussian family."""
    if not hasattr(q, "rsample"):
        raise InputError("the reparam estimator needs a reparameterisable (gaussian) latent")
    return f(q.rsample(num_samples)).mean(0)


@_posterior_as_family
def rloo(q, f, num_samples: int = 2) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019): the score function with baseline b_m = mean_{j != m} f(z_j),
    (1/M) sum_m (f(z_m) - b_m) grad ln q(z_m), z_m ~ q; unbiased, M >= 2. Same as ``importance(baseline="loo")``."""
    need_samples("rloo", num_samples)
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
    need_samples("vimco", num_samples)
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
def rws(q, f, num_samples: int = 2) -> torch.Tensor:
    """Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019): z_k ~ q, ln w_k = f(z_k) + ln p(z_k) -
    ln q(z_k), self-normalised weights w~ = softmax(ln w). The decoder (and a learned prior) follows the gradient
    of the K-sample IWAE bound L = ln (1/K) sum_k w_k, sum_k w~_k grad ln p(x, z_k) (wake-theta); the encoder
    follows sum_k w~_k grad ln q(z_k|x) (wake-phi), an estimate of -grad KL(p(z|x) || q(z|x)), the INCLUSIVE KL --
    another objective than the ELBO, biased for finite K (its mean is E[sum_k w~_k grad ln q(z_k)]). Returns
    L + KL(q || p) like ``vimco``, so the reported loss is -L. K >= 2 (one sample has w~ = 1: no signal)."""
    need_samples("rws", num_samples)
    z = q.sample(num_samples)
    log_q = q.log_prob(z)
    log_w = f(z) + q.prior_log_prob(z) - log_q.detach()  # decoder and prior gradients only
    bound = torch.logsumexp(log_w, 0) - math.log(num_samples)
    weights = torch.softmax(log_w.detach(), 0)
    wake_phi = (weights * (log_q - log_q.detach())).sum(0)
    return bound + wake_phi + q.kl_to_prior()


@_posterior_as_family
def disarm(q, f, num_samples: int = 2) -> torch.Tensor:
    """DisARM (Dong, Mnih & Tucker 2020) for Bernoulli latents: M / 2 antithetic pairs b = [u < sigma(eta)],
    b' = [1 - u < sigma(eta)] sharing u ~ U(0, 1)^c. Encoder gradient per pair and bit
    g_i = 1/2 (f(b) - f(b')) (b_i - b'_i) sigma(|eta_i|) d eta_i; value and decoder gradient (f(b) + f(b')) / 2.
    Unbiased; M even."""
    need_bits("disarm", q)
    need_samples("disarm", num_samples, pairs=True)
    with torch.no_grad():
        p = q.probs.expand(num_samples // 2, *q.logits.shape)
        with sampling():
            u = torch.rand_like(p)
        b, b_anti = (u < p).to(p.dtype), (1 - u < p).to(p.dtype)
    fb, fa = f(torch.cat([b, b_anti])).chunk(2)
    eta = q.logits
    direction = ((b - b_anti) * torch.sigmoid(eta.abs()).detach() * (eta - eta.detach())).sum(-1)
    return (0.5 * (fb + fa) + 0.5 * (fb - fa).detach() * direction).mean(0)


@_posterior_as_family
def arm(q, f, num_samples: int = 2) -> torch.Tensor:
    """ARM (Yin & Zhou 2019) for Bernoulli latents: M / 2 antithetic pairs b = [u > sigma(-eta)], b' = [u <
    sigma(eta)] sharing u ~ U(0, 1)^c, encoder gradient per pair (f(b) - f(b')) (u - 1/2) d eta (the authors'
    ``arm``); value and decoder gradient (f(b) + f(b')) / 2. Unbiased; DisARM is its Rao-Blackwellisation. M even."""
    need_bits("arm", q)
    need_samples("arm", num_samples, pairs=True)
    with torch.no_grad():
        p = q.probs.expand(num_samples // 2, *q.logits.shape)
        with sampling():
            u = torch.rand_like(p)
        b, b_anti = (u > 1 - p).to(p.dtype), (u < p).to(p.dtype)
    fb, fa = f(torch.cat([b, b_anti])).chunk(2)
    eta = q.logits
    direction = ((u - 0.5) * (eta - eta.detach())).sum(-1)
    return (0.5 * (fb + fa) + (fb - fa).detach() * direction).mean(0)


def dirichlet_copula_debias(eta: torch.Tensor, n: int) -> torch.Tensor:
    """1 / (1 - rho) for two of the n Bernoulli(sigma(eta)) draws of ``arms``, rho their correlation:
    p (1 - p) / (p - P(b_i = b_j = 1)) = (1 - a) / (1 - C(a, a) / a) with a = min(p, 1 - p) = sigma(-|eta|) and the
    Dirichlet copula C(a, a) = max(2 a^(1/(n-1)) - 1, 0)^(n-1) (for p >= 1/2 the draws are flipped to 1 - u, and
    P(b_i = b_j = 1) = 2p - 1 + C(1-p, 1-p)). Written so that a saturated bit (p = 0 or 1 in floating point) gives
    its limit 1, not 0/0."""
    a = torch.sigmoid(-eta.abs())
    joint = (2 * a.pow(1 / (n - 1)) - 1).clamp_min(0).pow(n - 1)
    ratio = torch.where(joint > 0, joint / a.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
    return (1 - a) / (1 - ratio)


@_posterior_as_family
def arms(q, f, num_samples: int = 2) -> torch.Tensor:
    """ARMS (Dimitriev & Zhou 2021) for Bernoulli latents: n = M negatively correlated draws per bit from the
    Dirichlet copula, u_i = (1 - d_i)^(n-1) with d ~ Dirichlet(1, ..., 1) (each u_i exactly uniform; 1 - u_i where
    p >= 1/2), b_i = [u_i < p]. Encoder gradient per bit
    1/(n-1) sum_i (f(b_i) - fbar) (b_i - p) p (1 - p) / (p - P(b_i = b_j = 1)), fbar = mean_j f(b_j): RLOO divided
    by 1 - rho, rho the draws' correlation (``dirichlet_copula_debias``), which makes it unbiased. n = 2 is DisARM.
    Value and decoder gradient (1/n) sum_i f(b_i). M >= 2."""
    need_bits("arms", q)
    need_samples("arms", num_samples)
    n = num_samples
    with torch.no_grad():
        p = q.probs.detach()
        with sampling():
            e = -torch.log1p(-torch.rand((n, *p.shape), dtype=p.dtype, device=p.device))  # Exp(1)
        u = (1 - e / e.sum(0, keepdim=True)).pow(n - 1)
        u = torch.where(p < 0.5, u, 1 - u)
        b = (u < p).to(p.dtype)
        scale = dirichlet_copula_debias(q.logits.detach(), n) * n / (n - 1)
    fb = f(b)
    fd = fb.detach()
    eta = q.logits
    advantage = (fd - fd.mean(0, keepdim=True))[..., None] * (b - p) * scale  # [n, B, D]
    return fb.mean(0) + (advantage.mean(0) * (eta - eta.detach())).sum(-1)


def _fitted(estimate: torch.Tensor, controls: list[torch.Tensor]) -> torch.Tensor:
    """estimate_b + sum_j a_bj control_bj (all ``[B, dim]``, the controls of mean zero), the coefficients a_b of data
    point b minimising sum_{b' != b} |estimate_b' + sum_j a_bj control_b'j|^2 (least squares by pseudo-inverse).
    a_b does not depend on b's own samples, so every control keeps mean zero and the sum stays unbiased; a batch of
    one has a = 0. (The papers instead learn the coefficients online by SGD on the estimate's squared norm.)"""
    c = torch.stack(controls, 1)  # [B, J, dim]
    gram, cross = c @ c.transpose(1, 2), c @ estimate[..., None]  # [B, J, J], [B, J, 1]
    a = -torch.linalg.pinv(gram.sum(0) - gram) @ (cross.sum(0) - cross)
    return estimate + (a * c).sum(1)


@unstackable
@_posterior_as_family
def double_cv_ls(q, f, num_samples: int = 2) -> torch.Tensor:
    """Double control variates (Titsias & Shi 2022) with a least-squares coefficient, for Bernoulli latents: RLOO
    whose baseline carries a second control variate, the first-order Taylor expansion of f around the other samples.

    z_k ~ q, s_k = z_k - sigma(eta) = d ln q(z_k) / d eta, g_k = grad_z f(z_k), gbar_-k = mean_{j != k} g_j,
    c_k = gbar_-k . s_k. Encoder gradient w.r.t. eta:
    (1/K) sum_k [f_k + a c_k - mean_{j != k} (f_j + a c_j)] s_k - a sigma(eta) sigma(-eta) gbar,
    gbar = mean_k g_k: the last term is the exact mean of the a-terms (E[c_k s_k | z_-k] = Cov(z) gbar_-k; gbar_-j
    is free of z_j, so E[c_j | z_-j] = 0). Unbiased for any a; a is fitted per data point on the batch's others
    (``_fitted``), where the paper learns it by SGD (``double-cv``, :class:`discvae.learned.DoubleCV`). K =
    ``num_samples`` >= 2 evaluations of f plus one backward pass for the K gradients (f must be differentiable in
    z)."""
    need_bits("double-cv-ls", q)
    need_samples("double-cv-ls", num_samples)
    z, fz, g = taylor_samples(q, f, num_samples)
    s, fd = z - q.probs.detach(), fz.detach()
    c = (sample_baseline(g, "loo") * s).sum(-1)
    variance = (torch.sigmoid(q.logits) * torch.sigmoid(-q.logits)).detach()
    control = loo_score(c, s) - variance * g.mean(0)
    return logit_surrogate(q, fz, _fitted(loo_score(fd, s), [control]))


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


@unstackable
@_posterior_as_family
def rodeo_ls(q, f, num_samples: int = 2) -> torch.Tensor:
    """RODEO's control variates with least-squares coefficients and a linear surrogate (after Shi, Zhou, Hwang,
    Titsias & Mackey 2022; the published, learned one is ``rodeo``) for Bernoulli latents: RLOO with two control
    variates made by
    the Gibbs Stein operator A (``gibbs_stein_linear``) from surrogates of f that cost no evaluation of f.

    z_k ~ q, s_k = z_k - sigma(eta), g_j = grad_z f(z_j); the surrogate of f for sample k is the mean first-order
    Taylor expansion around the others, fhat_k(y) = mean_{j != k} [f_j + g_j . (y - z_j)], taken as
    h_k(y) = fhat_k(y) - fhat_k(sigma(eta)) = gbar_-k . (y - sigma(eta)), and H_k = h_k s. Encoder gradient w.r.t.
    eta: (1/K) sum_k ([f_k - mean_{j != k} (f_j + a (A h_j)(z_j))] s_k + b (A H_k)(z_k)). E (A u) = 0 under q for
    any u, and h_j, H_k are free of z_j, z_k, so it is unbiased for any a, b. The paper's h, H are a small network
    of the surrogate, trained online with a, b by SGD on the estimate's squared norm (the authors'
    ``discrete_stein_avg``, github.com/thjashin/rodeo; ``rodeo``, :class:`discvae.learned.RODEO`); this pure
    function keeps no state: h, H are the centred linear surrogate above and (a, b) are fitted per data point on
    the batch's others (``_fitted``). K = ``num_samples`` >= 2 evaluations of f plus one backward pass for the K
    gradients; the Stein operator needs no evaluation at the D neighbours (f must be differentiable in z)."""
    need_bits("rodeo-ls", q)
    need_samples("rodeo-ls", num_samples)
    z, fz, g = taylor_samples(q, f, num_samples)
    s, fd = z - q.probs.detach(), fz.detach()
    a_h, a_hs = gibbs_stein_linear(q, z, sample_baseline(g, "loo"))
    controls = [-(sample_baseline(a_h, "loo")[..., None] * s).mean(0), a_hs.mean(0)]
    return logit_surrogate(q, fz, _fitted(loo_score(fd, s), controls))


def _relaxed(q, num_samples: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not getattr(q, "discrete", False):
        raise InputError("relaxed estimators need a bernoulli or categorical latent")
    if not tau > 0:
        raise InputError(f"the temperature tau must be positive, got {tau}", "tau")
    return q.relaxed_sample(num_samples, tau)


@unstackable
@_posterior_as_family
def gumbel(q, f, num_samples: int = 1, tau: float = 1.0) -> torch.Tensor:
    """Concrete / Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017): (1/M) sum_m f(z~_m) with
    z~_m = softmax((eta + g_m) / tau) per group (binary concrete sigmoid((eta + L) / tau) for bits), gradients
    pathwise. BIASED: it estimates the relaxed objective E[f(z~)], whose value and gradient reach E_q[f(z)] only as
    tau -> 0, where the gradient's variance grows without bound."""
    soft, _ = _relaxed(q, num_samples, tau)
    return f(soft).mean(0)


@unstackable
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


ESTIMATORS = {"importance": importance, "reparam": reparam, "rloo": rloo, "vimco": vimco, "rws": rws, "arm": arm,
              "arms": arms, "disarm": disarm, "double-cv-ls": double_cv_ls, "rodeo-ls": rodeo_ls, "gumbel": gumbel,
              "st-gumbel": st_gumbel, "straight-through": straight_through, "exact": exact, **LEARNED}
"""The registered estimators by name (``--estimator NAME``, ``make_estimator("NAME")``): each a function
``estimator(q, f, **options)``, or, for those with learned state (added from :mod:`discvae.learned` below), a
module class whose instances are called so."""


@dataclass(frozen=True)
class Estimator:
    """An estimator function with options bound: ``Estimator(q, f, **more)`` is ``function(q, f, **options,
    **more)``, ``more`` overriding ``options`` (e.g. an annealed temperature). ``name`` is the registered name of
    ``function`` or its qualified name. Build it with :func:`make_estimator`, which checks the options.

    It answers the questions the training loop asks of any estimator, as a module with learned state
    (:class:`discvae.learned.LearnedEstimator`) does: it has no parameters, an empty ``state_dict``, and ``train``,
    ``eval`` and ``to`` leave it as it is."""

    name: str
    function: Callable
    options: dict = field(default_factory=dict)

    def __call__(self, q, f, **more) -> torch.Tensor:
        return self.function(q, f, **{**self.options, **more})

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    evaluations_per_sample = 1  # evaluations of f per sample of z (compare's equal-budget column)
    compilable = True  # whether the training step may run under torch.compile (``Config.compile``)

    @property
    def stackable(self) -> bool:
        """Whether it runs on stacked weights (``compare --stacked``; see ``unstackable``)."""
        return getattr(self.function, "stackable", True)

    def parameters(self):
        return iter(())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise InputError(f"estimator {self.name} keeps no state, but the checkpoint holds some for it")

    def train(self, mode: bool = True) -> "Estimator":
        return self

    def eval(self) -> "Estimator":
        return self

    def to(self, *args, **kwargs) -> "Estimator":
        return self


def estimator_name(function: Callable) -> str:
    """The name ``function`` is registered under in ``ESTIMATORS``, else ``module.qualname`` (for a callable object,
    of its class)."""
    registered = [name for name, fn in ESTIMATORS.items() if fn is function]
    named = function if hasattr(function, "__qualname__") else type(function)
    return registered[0] if registered else f"{named.__module__}.{named.__qualname__}"


OPTION_FLAGS = ("num_samples", "proposal", "baseline", "tau")
"""The estimator options with a flag of their own (``Config.estimator_options``); any other is an option its
estimator spells (``--estimator-option hidden=50``, ``compare rodeo:hidden=50``)."""


def make_estimator(estimator, **options):
    """An estimator resolved once, its options bound after checking them against the function's signature.

    Option *values* are checked by the estimator when it runs (e.g. ``num_samples`` of at least 2 for rloo).

    Args:
        estimator: a name of ``ESTIMATORS``, a function ``estimator(q, f, **options) -> surrogate [B]`` (the
            contract of this module), an :class:`Estimator` (its options updated by ``options``), a
            :class:`~discvae.learned.LearnedEstimator` class (a new one is built with ``options``) or instance
            (returned as it is, with its state; ``options`` are checked as the ones it is called with).
        **options: keyword arguments of the function, e.g. ``num_samples=4``.

    Returns:
        The :class:`Estimator` (a callable ``(q, f, **more)`` with ``name``, ``function`` and ``options``), or the
        module with learned state, which answers the same (and ``parameters()``).

    Raises:
        InputError: an unknown name, something not callable, or an option the function does not take.
    """
    if isinstance(estimator, Estimator):
        return make_estimator(estimator.function, **{**estimator.options, **options})
    if isinstance(estimator, torch.nn.Module):  # options: those it is called with (e.g. a run's num_samples)
        check_options(estimator.name, estimator.forward, options)
        return estimator
    function = _resolve(estimator)
    name = estimator_name(function)
    if isinstance(function, type) and issubclass(function, torch.nn.Module):
        check_options(name, function, options, positional=0)
        return function(**options)
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


def check_options(name: str, function: Callable, options: dict, positional: int = 2) -> None:
    """InputError unless ``function(q, f, **options)`` binds (``inspect.Signature.bind``; a module class with
    ``positional=0``: its constructor ``cls(**options)``): an option the function does not take is named with those
    it takes, a required one left out by Python's own message."""
    signature = inspect.signature(function)
    try:
        signature.bind(*[None] * positional, **options)
    except TypeError as err:
        takes = [p.name for p in list(signature.parameters.values())[positional:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in options if k not in takes]
        if unknown:  # the options with a flag of their own are named so that a front end can show its names
            raise InputError(f"estimator {name} takes no option {unknown[0]!r} (it takes "
                             f"{', '.join(takes) or 'none'})",
                             *[n for n in (unknown[0], *takes) if n in OPTION_FLAGS]) from None
        raise InputError(f"estimator {name}: {err}") from None
