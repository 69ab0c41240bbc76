"""Gradient estimators with learned state: NVIL, REBAR, RELAX, and double CV and RODEO as published.

Each is a :class:`LearnedEstimator`, a ``torch.nn.Module`` called like any estimator of :mod:`discvae.estimators`,
``est(q, f, **options) -> surrogate [B]``, that owns parameters (and buffers) of its own. The contract with the
training loop is one rule: **the backward pass of the loss leaves on the estimator's parameters the gradient of its
own training objective, and leaves the model's gradients as the estimate alone makes them.** The estimator adds to
its surrogate a term of value zero whose gradient reaches only its parameters (``LearnedEstimator.descend``); the
loop steps those parameters with an Adam of their own (``Config.estimator_lr``), saves ``state_dict()`` and that
optimizer in the checkpoint, and under torchrun averages their gradients and floating buffers over the ranks. It
does not know which estimator runs.

How each learns: the control-variate estimators (``rebar``, ``relax``, ``double-cv``, ``rodeo``) minimise the
squared norm of their estimate of grad_eta E_q[f], mean over the batch and the latent's coordinates -- the RELAX /
REBAR device: E |g|^2 = |grad|^2 + Var g, and the mean of an unbiased g does not depend on what they learn, so this
is the variance; ``nvil`` fits its baseline by regression and keeps running moments by its own rule. In eval mode
(``est.eval()``) nothing is learned or updated. Networks are lazy (``torch.nn.LazyLinear``): sized at the first
call; the training loop makes that call before it builds their optimizer.

All are for Bernoulli latents, where q(z) = prod_i sigma(eta_i)^z_i sigma(-eta_i)^(1 - z_i), so that
grad_eta ln q(z) = z - sigma(eta).
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from .distributions import as_family, sampling
from .errors import InputError, finite, non_negative_finite, positive_finite, positive_int
from .surrogates import logit_surrogate, loo_score, need_bits, need_samples, sample_baseline, taylor_samples


class LearnedEstimator(nn.Module, abc.ABC):
    """The base of estimators with learned state (module docstring): ``forward(q, f, **options)`` converts ``q``
    (``as_family``), checks it and ``num_samples``, and returns ``estimate(q, f, num_samples)``. A subclass sets
    ``name`` (its registered name), ``min_samples`` and implements :meth:`estimate`; constructor arguments are its
    options (``options`` records them, as for a stateless :class:`~discvae.estimators.Estimator`)."""

    min_samples = 1
    evaluations_per_sample = 1  # evaluations of f per sample of z (compare's equal-budget column)
    stackable = False  # its parameters are one per run: compare --stacked refuses it
    compilable = False  # descend takes torch.autograd.grad inside the step, which a compiled step cannot share

    def __init__(self, num_samples: int = 2, **options):
        super().__init__()
        self.options = {"num_samples": num_samples, **options}

    @property
    def name(self) -> str:
        """Its registered name (a registered subclass's class attribute), else its class's ``module.qualname``."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    @property
    def function(self) -> type:
        """What the registry holds for it: its class (``make_estimator`` builds a new one from it)."""
        return type(self)

    def forward(self, q, f, num_samples: int | None = None, **built) -> torch.Tensor:
        """The surrogate [B]; ``num_samples`` may differ from the constructor's, other options (what a run's
        configuration records and passes) must be those it was built with."""
        changed = [k for k, v in built.items() if self.options.get(k, v) != v or k not in self.options]
        if changed:
            raise InputError(f"estimator {self.name}: option {changed[0]!r} is set when it is built, not per call "
                             f"(it was built with {self.options})", changed[0])
        q = as_family(q)
        num_samples = self.options["num_samples"] if num_samples is None else num_samples
        need_bits(self.name, q)
        if self.min_samples > 1:
            need_samples(self.name, num_samples)
        elif num_samples < 1:
            raise InputError(f"{self.name} needs num_samples of at least 1, got {num_samples}", "num_samples")
        return self.estimate(q, f, num_samples)

    @abc.abstractmethod
    def estimate(self, q, f, num_samples: int) -> torch.Tensor:
        """The surrogate [B] of E_q[f] from ``num_samples`` samples, ``q`` a checked Bernoulli family."""

    @property
    def learning(self) -> bool:
        """Whether this call trains the estimator: training mode, with gradients enabled."""
        return self.training and torch.is_grad_enabled()

    def descend(self, objective: torch.Tensor) -> torch.Tensor:
        """A scalar of value 0 whose gradient is d ``objective`` / d phi on this estimator's parameters phi and zero on
        everything else (the model's parameters, the logits), when :attr:`learning`; else 0. Subtracted from every
        row of the surrogate, it makes the loss's backward pass leave d objective / d phi on phi (the loss holds
        minus the batch mean of the surrogate)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not (self.learning and params and objective.requires_grad):
            return torch.zeros((), device=objective.device, dtype=objective.dtype)
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        pulled = [(p * g.detach()).sum() for p, g in zip(params, grads, strict=True) if g is not None]
        if not pulled:
            return torch.zeros((), device=objective.device, dtype=objective.dtype)
        total = torch.stack(pulled).sum()
        return total - total.detach()

    def with_variance_descent(self, q, fz: torch.Tensor, grad_eta: torch.Tensor) -> torch.Tensor:
        """The surrogate of an estimate ``grad_eta`` [B, D] of grad_eta E_q[f] (value and decoder gradient the mean
        of ``fz`` [K, B]), its parameters trained on the squared norm of ``grad_eta``, mean over batch and bits."""
        return logit_surrogate(q, fz, grad_eta.detach()) - self.descend(grad_eta.pow(2).mean())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _need(ok: bool, estimator: str, option: str, what: str, value) -> None:
    """A one-line ``InputError`` unless ``ok``: "``estimator`` needs ``option`` ``what``, got ``value``"."""
    if not ok:
        raise InputError(f"{estimator} needs {option} {what}, got {value!r}")  # an option, not a flag: not renamed


def _mlp(hidden: int, out: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.LazyLinear(hidden), nn.Tanh(), nn.Linear(hidden, out))


class NVIL(LearnedEstimator):
    """NVIL (Mnih & Gregor 2014): the score function with a learned, input-dependent baseline and variance
    normalisation. z_k ~ q, learning signal l_k = f(z_k) - c - b_psi(eta) with b_psi a one-hidden-layer tanh network
    of the logits eta (a function of x, so it stays a valid baseline; detached), c a running mean of f; encoder
    gradient (1/K) sum_k l_k / max(1, sqrt(v)) (z_k - sigma(eta)), v a running variance of l. b_psi is fitted by
    regression, min (f - c - b_psi)^2; c and v are moving averages with ``decay`` (0.8), updated after each
    training call. The estimate is unbiased for grad E_q[f] / max(1, sqrt(v)), a positive rescaling (a step size),
    exactly so with ``normalise=False``."""

    name = "nvil"

    def __init__(self, num_samples: int = 1, hidden: int = 100, decay: float = 0.8, normalise: bool = True):
        super().__init__(num_samples, hidden=hidden, decay=decay, normalise=normalise)
        _need(positive_int(hidden), "nvil", "hidden", "of at least 1", hidden)
        _need(non_negative_finite(decay) and decay < 1, "nvil", "decay", "in [0, 1)", decay)
        self.baseline = _mlp(hidden)
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))

    def scale(self) -> torch.Tensor:
        """The variance normalisation max(1, sqrt(v)) (1 without ``normalise``)."""
        return self.var.sqrt().clamp_min(1) if self.options["normalise"] else torch.ones_like(self.var)

    def estimate(self, q, f, num_samples):
        z = q.sample(num_samples)
        fz, log_q = f(z), q.log_prob(z)
        b = self.baseline(q.logits.detach().to(self.mean.dtype)).squeeze(-1).to(fz.dtype)  # [B]
        centred = fz.detach() - self.mean
        signal = (centred - b.detach()) / self.scale()
        fit = (centred - b).pow(2).mean()
        if self.learning:
            with torch.no_grad():
                decay, raw = self.options["decay"], signal * self.scale()
                self.mean.mul_(decay).add_((1 - decay) * fz.detach().mean().to(self.mean.dtype))
                self.var.mul_(decay).add_((1 - decay) * raw.var(unbiased=False).to(self.var.dtype))
        return (fz + signal * (log_q - log_q.detach())).mean(0) - self.descend(fit)


def open_uniform(shape, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) draws whose logarithms ln u and ln(1 - u) are finite: ``torch.rand`` gives multiples of 2^-24 (float32;
    2^-53 in float64) in [0, 1), and its draw of exactly 0 (probability 2^-24), whose logarithm is -inf and made
    REBAR's and RELAX's gradients NaN, is taken as the midpoint of its cell, half a step."""
    return torch.rand(shape, dtype=like.dtype, device=like.device).clamp_min_(torch.finfo(like.dtype).eps / 4)


def _logistic(eta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """z = eta + ln u - ln(1 - u): H(z) = [z > 0] ~ Bernoulli(sigma(eta))."""
    return eta + torch.log(u) - torch.log1p(-u)


def conditional_logistic(eta: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z~ ~ p(z | H(z) = b) by reparameterisation with v ~ U(0, 1), a function of eta (its gradient flows; Tucker
    et al. 2017): z~ = logit(p) + logit(v') with v' = 1 - p (1 - v) where b = 1 and v' = v (1 - p) where b = 0,
    p = sigma(eta); in log space z~ = softplus(eta + ln v) - ln(1 - v) and ln v - softplus(ln(1 - v) - eta)."""
    log_v, log_1mv = torch.log(v), torch.log1p(-v)
    softplus = nn.functional.softplus
    return torch.where(b > 0, softplus(eta + log_v) - log_1mv, log_v - softplus(log_1mv - eta))


class REBAR(LearnedEstimator):
    """REBAR (Tucker et al. 2017) for Bernoulli latents: z = eta + logit u, b = H(z), z~ ~ p(z | b) (by
    ``conditional_logistic``, a function of eta), control variate c(z) = s f(sigma(z / lambda)); encoder gradient
    [f(b) - c(z~)] (b - sigma(eta)) + grad_eta c(z) - grad_eta c(z~), averaged over K = ``num_samples`` independent
    draws; unbiased for any temperature lambda and scale s, which it learns (log lambda from ln 0.5, s from 1) by
    minimising the estimate's squared norm. Three evaluations of f per draw (f(b), f at the two relaxed points; f
    takes real z); the relaxed terms reach only the logits and the estimator's parameters, never the decoder."""

    name = "rebar"
    evaluations_per_sample = 3

    def __init__(self, num_samples: int = 1, temperature: float = 0.5, scale: float = 1.0):
        super().__init__(num_samples, temperature=temperature, scale=scale)
        _need(positive_finite(temperature), self.name, "temperature", "positive and finite", temperature)
        _need(finite(scale), self.name, "scale", "finite", scale)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def control(self, z: torch.Tensor, f, eta: torch.Tensor) -> torch.Tensor:
        """c(z) = s f(sigma(z / lambda)) for logistic samples ``z`` [K, B, D] (of the logits ``eta``): [K, B]."""
        return self.scale * f(torch.sigmoid(z / self.log_temperature.exp()))

    def estimate(self, q, f, num_samples):
        eta = q.logits.detach().requires_grad_()  # the relaxed terms' own leaf: their graph stops here
        with torch.no_grad(), sampling():
            u, v = (open_uniform((num_samples, *eta.shape), eta) for _ in range(2))
        with torch.enable_grad():
            z = _logistic(eta, u)
            b = (z > 0).to(eta.dtype).detach()
            fb = f(b)
            relaxed = self.control(torch.cat([z, conditional_logistic(eta, b, v)]), f, eta.detach())
            c_z, c_cond = relaxed.chunk(2)
            pathwise, = torch.autograd.grad((c_z - c_cond).sum(), eta, create_graph=self.learning)
            score = (fb.detach() - c_cond)[..., None] * (b - torch.sigmoid(eta).detach())  # its coefficient learns
            grad_eta = score.mean(0) + pathwise / num_samples
        return self.with_variance_descent(q, fb, grad_eta)


class RELAX(REBAR):
    """RELAX (Grathwohl et al. 2018) for Bernoulli latents: REBAR whose control variate gains a learned network,
    c(z) = s [f(sigma(z / lambda)) + r_phi(z, eta)], r_phi two hidden layers of ``hidden`` ReLU units on the logistic
    sample z and the logits (detached: a function of x, as the authors' network reads x), as in the authors' MNIST
    VAE; lambda, s and r_phi are learned together on the estimate's squared norm. Unbiased for any of them."""

    name = "relax"

    def __init__(self, num_samples: int = 1, temperature: float = 0.5, scale: float = 1.0, hidden: int = 200):
        super().__init__(num_samples, temperature, scale)
        _need(positive_int(hidden), self.name, "hidden", "of at least 1", hidden)
        self.options["hidden"] = hidden
        self.network = nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 1))

    def control(self, z, f, eta):
        r = self.network(torch.cat([z, eta.expand_as(z)], -1).to(self.scale.dtype)).squeeze(-1).to(z.dtype)
        return self.scale * (f(torch.sigmoid(z / self.log_temperature.exp())) + r)


class DoubleCV(LearnedEstimator):
    """Double control variates as published (Titsias & Shi 2022; the authors' ``double_cv``): the estimate of
    :func:`~discvae.estimators.double_cv_ls` with its coefficient alpha learned (from 0) by Adam on the estimate's
    squared norm, instead of fitted per step. z_k ~ q, s_k = z_k - sigma(eta), g_k = grad_z f(z_k),
    gbar_-k = mean_{j != k} g_j, c_k = gbar_-k . s_k; encoder gradient
    (1/K) sum_k [f_k + alpha c_k - mean_{j != k} (f_j + alpha c_j)] s_k - alpha sigma(eta) sigma(-eta) gbar.
    Unbiased for any alpha. K evaluations of f and one backward pass (f differentiable in z)."""

    name = "double-cv"
    min_samples = 2

    def __init__(self, num_samples: int = 2):
        super().__init__(num_samples)
        self.alpha = nn.Parameter(torch.zeros(()))

    def estimate(self, q, f, num_samples):
        z, fz, g = taylor_samples(q, f, num_samples)
        s, fd = z - q.probs.detach(), fz.detach()
        c = (sample_baseline(g, "loo") * s).sum(-1)
        variance = (torch.sigmoid(q.logits) * torch.sigmoid(-q.logits)).detach()
        control = loo_score(c, s) - variance * g.mean(0)
        return self.with_variance_descent(q, fz, loo_score(fd, s) + self.alpha.to(fd.dtype) * control)


class SteinControl(nn.Module):
    """RODEO's control network (the authors' ``SteinControlNNSingleLayer``): two scalars, the surrogate's value s
    and the others' mean m, to two outputs, H(s, m) = W2 LeakyReLU_0.3(W_s s + W_m m + b) + b2, ``hidden`` units."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.s, self.m, self.out = nn.Linear(1, hidden), nn.Linear(1, hidden, bias=False), nn.Linear(hidden, 2)

    def forward(self, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        dtype = self.out.weight.dtype
        h = self.s(s[..., None].to(dtype)) + self.m(m[..., None].to(dtype))
        return self.out(nn.functional.leaky_relu(h, 0.3)).to(s.dtype)


class RODEO(LearnedEstimator):
    """RODEO as published (Shi, Zhou, Hwang, Titsias & Mackey 2022; the authors' ``discrete_stein_avg``): RLOO whose
    baseline and estimate carry control variates made by the Gibbs Stein operator
    (A u)(x) = (1/D) sum_i q(not x_i) [u(x^(i)) - u(x)] from a learned network of a cheap surrogate of f.

    z_k ~ q, s_k = z_k - sigma(eta), g_j = grad_z f(z_j); for sample k the surrogate is the others' mean Taylor
    expansion without its constant, t_k(y) = mean_{j != k} g_j . (y - z_j), and m_k = mean_{j != k} f_j; the
    network H = :class:`SteinControl` makes h0_k(y) = H_0(t_k(y), m_k) and h1_k(y) = H_1(t_k(y), m_k) (y - sigma(eta)).
    Encoder gradient (1/K) sum_k ([f_k - mean_{j != k} (f_j + alpha (A h0_j)(z_j))] s_k + beta (A h1_k)(z_k)):
    h_j is free of z_j, so each Stein term has mean 0 and the estimate is unbiased for any alpha, beta and network.
    alpha, beta (from 0) and the network are learned by Adam on the estimate's squared norm (the authors' code also
    declares a third coefficient, gamma, that no term uses: left out). K evaluations of f, one backward pass, the
    network at the K (D + 1) points z_k and their D neighbours."""

    name = "rodeo"
    min_samples = 2

    def __init__(self, num_samples: int = 2, hidden: int = 100):
        super().__init__(num_samples, hidden=hidden)
        _need(positive_int(hidden), self.name, "hidden", "of at least 1", hidden)
        self.alpha, self.beta = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        self.network = SteinControl(hidden)

    def estimate(self, q, f, num_samples):
        z, fz, g = taylor_samples(q, f, num_samples)
        theta = q.probs.detach()
        s, fd = z - theta, fz.detach()
        g_loo = sample_baseline(g, "loo")  # [K, B, D]
        t_z = (g_loo * z).sum(-1) - sample_baseline((g * z).sum(-1), "loo")  # t_k(z_k) [K, B]
        flip = 1 - 2 * z  # z^(i) - z = e_i (1 - 2 z_i)
        others = sample_baseline(fd, "loo")  # m_k [K, B]
        out_z = self.network(t_z, others)  # [K, B, 2]
        out_n = self.network(t_z[..., None] + g_loo * flip, others[..., None].expand_as(z))  # [K, B, D, 2]
        w = theta * (1 - z) + (1 - theta) * z  # q(not z_i)
        stein_h0 = (w * (out_n[..., 0] - out_z[..., :1])).mean(-1)  # (A h0_k)(z_k) [K, B]
        # (A h1_k)(z_k): h1(z^(i)) - h1(z) = H1(z^(i)) (s + e_i flip_i) - H1(z) s, averaged over i with weights w
        stein_h1 = (s * (w * (out_n[..., 1] - out_z[..., 1:])).mean(-1, keepdim=True)
                    + w * out_n[..., 1] * flip / z.shape[-1])  # [K, B, D]
        alpha, beta = self.alpha.to(fd.dtype), self.beta.to(fd.dtype)
        baseline = sample_baseline(fd + alpha * stein_h0, "loo")
        grad_eta = ((fd - baseline)[..., None] * s + beta * stein_h1).mean(0)
        return self.with_variance_descent(q, fz, grad_eta)


LEARNED = {cls.name: cls for cls in (NVIL, REBAR, RELAX, DoubleCV, RODEO)}
"""The registered estimators with learned state, by name."""
