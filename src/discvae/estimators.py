"""Gradient estimators of the expected log-likelihood E_q[f(z)], f(z) = ln p(x|z).

Each estimator is one pure function ``estimator(q, f, num_samples=1, **options) -> surrogate`` of a latent
distribution ``q`` (see :mod:`discvae.distributions`, gradients flowing to the encoder through its parameters) and a
black box ``f``: ``f(z)`` takes ``z`` of shape ``[M, B', dim]`` (``B'`` the batch size, or 1 for a state shared by
the batch) and returns ``[M, B]``. The returned ``surrogate`` has shape ``[B]``: its *value* is the estimate of
E_q[f(z)] and its *gradient* is the estimated gradient. Nothing else knows which estimator runs.

Unbiased for grad E_q[f]: ``importance`` (any baseline), ``rloo``, ``disarm``, ``exact``. ``vimco`` is unbiased for
the gradient of a different objective, the M-sample IWAE bound. ``gumbel``, ``st-gumbel`` and ``straight-through``
are biased. ``num_samples`` M counts decoder evaluations per data point (``disarm``: M / 2 antithetic pairs;
``exact`` ignores it and decodes each of the S latent states once per batch).
"""
from __future__ import annotations

import math

import torch

from .distributions import Bernoulli
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
            raise InputError("the loo baseline needs --num-samples of at least 2")
        return (fz.sum(0, keepdim=True) - fz) / (m - 1)
    if kind == "mean":
        return (fz.sum() - fz) / (n - 1) if n > 1 else 0.0
    raise InputError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


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


def reparam(q, f, num_samples: int = 1) -> torch.Tensor:
    """Reparameterised sampling z = mu + sigma eps (eq. 8-11), for the Gaussian family."""
    if not hasattr(q, "rsample"):
        raise InputError("the reparam estimator needs a reparameterisable (gaussian) latent")
    return f(q.rsample(num_samples)).mean(0)


def _need_samples(name: str, num_samples: int, pairs: bool = False) -> None:
    if pairs and (num_samples < 2 or num_samples % 2):
        raise InputError(f"{name} needs an even --num-samples (2 per antithetic pair), got {num_samples}")
    if num_samples < 2:
        raise InputError(f"{name} needs --num-samples of at least 2, got {num_samples}")


def rloo(q, f, num_samples: int = 2) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019): the score function with baseline b_m = mean_{j != m} f(z_j),
    (1/M) sum_m (f(z_m) - b_m) grad ln q(z_m), z_m ~ q; unbiased, M >= 2. Same as ``importance(baseline="loo")``."""
    _need_samples("rloo", num_samples)
    return importance(q, f, num_samples, baseline="loo")


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
        raise InputError(f"the temperature tau must be positive, got {tau}")
    return q.relaxed_sample(num_samples, tau)


def gumbel(q, f, num_samples: int = 1, tau: float = 1.0) -> torch.Tensor:
    """Concrete / Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017): (1/M) sum_m f(z~_m) with
    z~_m = softmax((eta + g_m) / tau) per group (binary concrete sigmoid((eta + L) / tau) for bits), gradients
    pathwise. BIASED: it estimates the relaxed objective E[f(z~)], whose value and gradient reach E_q[f(z)] only as
    tau -> 0, where the gradient's variance grows without bound."""
    soft, _ = _relaxed(q, num_samples, tau)
    return f(soft).mean(0)


def st_gumbel(q, f, num_samples: int = 1, tau: float = 1.0) -> torch.Tensor:
    """Straight-through Gumbel-softmax (Jang et al. 2017): the forward pass decodes the hard sample z = argmax
    (an exact sample of q, so the value is unbiased), the backward pass the relaxed one: z + z~ - sg(z~). The
    gradient is BIASED for every tau."""
    soft, hard = _relaxed(q, num_samples, tau)
    return f(hard + soft - soft.detach()).mean(0)


def straight_through(q, f, num_samples: int = 1) -> torch.Tensor:
    """Straight-through (Bengio et al. 2013; as in VQ-VAE): decode z ~ q, backpropagate as if z were its mean:
    z + E_q[z] - sg(E_q[z]), i.e. grad = (df/dz)(z) dE_q[z]/d eta. Value unbiased, gradient BIASED."""
    if not getattr(q, "discrete", False):
        raise InputError("straight-through needs a bernoulli or categorical latent")
    mean = q.mean
    return f(q.sample(num_samples) + mean - mean.detach()).mean(0)


EXACT_MAX_STATES = 4096


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
