"""Each score-function estimator's gradient equals its formula written out here, on the very samples it drew (f
records them): exact to float64 precision, so a change of a baseline or a coefficient that keeps the estimate
unbiased -- invisible to the unbiasedness tests, visible in its variance -- fails here."""
import math

import numpy as np
import pytest
import torch

from discvae.distributions import Bernoulli
from discvae.estimators import ESTIMATORS, _fitted
from helpers import tiny_data, tiny_model

M = 3  # samples per data point


def posterior_and_f(seed: int = 0, n: int = 4):
    """Bernoulli(eta) with eta a leaf ``[n, 3]`` and f(z) = ln p(x|z) of the tiny decoder (no gradient to eta), which
    records every z it is given."""
    model, x = tiny_model("bernoulli", 3, seed=seed), tiny_data(n)
    eta = model.encoder(x).detach().requires_grad_()
    seen = []

    def f(z):
        seen.append(z.detach().clone())
        return model.log_likelihood(x, z)

    return eta, f, seen


def grad_eta(estimator: str, eta, f, **options) -> torch.Tensor:
    value = ESTIMATORS[estimator](Bernoulli(eta), f, **options)
    return torch.autograd.grad(value.sum(), eta)[0]


@pytest.mark.parametrize("estimator,options", [("rloo", {}), ("importance", {"baseline": "loo"})])
def test_rloo_is_its_leave_one_out_formula(estimator, options):
    """(1/M) sum_m (f_m - mean_{j != m} f_j) (z_m - sigma(eta))."""
    eta, f, seen = posterior_and_f()
    got = grad_eta(estimator, eta, f, num_samples=M, **options)
    z, = seen
    fz = f(z).detach()
    assert torch.allclose(got, rloo_part(fz, z - torch.sigmoid(eta.detach())), rtol=1e-12, atol=1e-14)


def test_the_mean_baseline_is_the_rest_of_the_batch():
    """importance with one sample and baseline='mean': (f_b - mean_{b' != b} f_b') (z_b - sigma(eta_b))."""
    eta, f, seen = posterior_and_f()
    got = grad_eta("importance", eta, f, baseline="mean")
    z, = seen
    fz = f(z).detach()[0]
    want = (fz - (fz.sum() - fz) / (len(fz) - 1))[:, None] * (z[0] - torch.sigmoid(eta.detach()))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_a_fixed_proposal_may_be_given_as_a_list():
    """proposal=[...] is the tensor of the posterior's dtype: the same samples and the same gradient."""
    xi = [0.3, -0.2, 0.1]
    grads = []
    for proposal in (xi, torch.tensor(xi, dtype=torch.float64)):
        eta, f, _ = posterior_and_f()
        torch.manual_seed(5)
        grads.append(grad_eta("importance", eta, f, num_samples=M, proposal=proposal))
    assert torch.equal(*grads)


def test_vimco_is_its_formula():
    """Mnih & Rezende (2016), f and the uniform prior free of eta: ln w_m = f_m - c ln 2 - ln q(z_m), L = ln mean w;
    grad = sum_m w~_m grad ln w_m + sum_m (L - L_-m) grad ln q(z_m) + grad KL(q || p), grad ln q(z_m) = z_m - sigma,
    L_-m with ln w_m replaced by the mean of the other ln w_j, grad KL = sigma (1 - sigma) eta."""
    eta, f, seen = posterior_and_f()
    got = grad_eta("vimco", eta, f, num_samples=M)
    z, = seen
    e, sig = eta.detach(), torch.sigmoid(eta.detach())
    log_q = (z * torch.log(sig) + (1 - z) * torch.log1p(-sig)).sum(-1)
    log_w = f(z).detach() - 3 * math.log(2.0) - log_q  # [M, B]
    bound = torch.logsumexp(log_w, 0) - math.log(M)
    tilde = torch.softmax(log_w, 0)
    want = sig * (1 - sig) * e
    for m in range(M):
        others = [j for j in range(M) if j != m]
        replaced = torch.stack([log_w[j] for j in others] + [log_w[others].mean(0)])
        bound_m = torch.logsumexp(replaced, 0) - math.log(M)
        want = want + (-tilde[m] + bound - bound_m)[:, None] * (z[m] - sig)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_fitted_coefficients_are_least_squares_on_the_other_data_points():
    """_fitted (double-cv's and rodeo's coefficients): for data point b, a_b minimises
    sum_{b' != b} |e_b' + sum_j a_j c_b'j|^2 (numpy's lstsq here), and the result is e_b + sum_j a_bj c_bj."""
    g = torch.Generator().manual_seed(0)
    b, j, d = 6, 2, 5
    estimate = torch.randn(b, d, generator=g, dtype=torch.float64)
    controls = [torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(j)]
    got = _fitted(estimate, controls)
    for i in range(b):
        rest = [k for k in range(b) if k != i]
        design = np.stack([c[rest].reshape(-1).numpy() for c in controls], 1)  # [(B - 1) d, J]
        a = np.linalg.lstsq(design, -estimate[rest].reshape(-1).numpy(), rcond=None)[0]
        want = estimate[i] + sum(a[k] * controls[k][i] for k in range(j))
        assert torch.allclose(got[i], want, rtol=1e-10, atol=1e-12), i


def taylor_pieces(eta, f, seen):
    """The K samples the estimator drew, f at them, g_k = grad_z f(z_k), s_k = z_k - sigma(eta) and the
    leave-one-out mean of g, gbar_-k."""
    z, = seen
    z = z.clone().requires_grad_()
    fz = f(z)
    g, = torch.autograd.grad(fz.sum(), z)
    g_loo = (g.sum(0) - g) / (M - 1)
    return z.detach(), fz.detach(), g, z.detach() - torch.sigmoid(eta.detach()), g_loo


def rloo_part(fz, s):
    return sum((fz[k] - (fz.sum(0) - fz[k]) / (M - 1))[:, None] * s[k] for k in range(M)) / M


def test_double_cv_is_its_formula():
    """(1/K) sum_k [f_k + a c_k - mean_{j != k} (f_j + a c_j)] s_k - a sigma(eta) sigma(-eta) gbar with
    c_k = gbar_-k . s_k, a fitted on the other data points (_fitted, checked above)."""
    eta, f, seen = posterior_and_f()
    got = grad_eta("double-cv-ls", eta, f, num_samples=M)
    z, fz, g, s, g_loo = taylor_pieces(eta, f, seen)
    c = (g_loo * s).sum(-1)  # [K, B]
    sig = torch.sigmoid(eta.detach())
    control = rloo_part(c, s) - sig * (1 - sig) * g.mean(0)
    assert torch.allclose(got, _fitted(rloo_part(fz, s), [control]), rtol=1e-10, atol=1e-12)


def test_rodeo_is_its_formula():
    """(1/K) sum_k ([f_k - mean_{j != k} (f_j + a (A h_j)(z_j))] s_k + b (A H_k)(z_k)) with h_k(y) = gbar_-k .
    (y - sigma(eta)), H_k = h_k s and the Gibbs Stein operator written out bit by bit here:
    (A u)(x) = (1/D) sum_i q(not x_i) [u(x^(i)) - u(x)]; (a, b) fitted on the other data points."""
    eta, f, seen = posterior_and_f()
    got = grad_eta("rodeo-ls", eta, f, num_samples=M)
    z, fz, g, s, g_loo = taylor_pieces(eta, f, seen)
    sig = torch.sigmoid(eta.detach())
    d = z.shape[-1]
    a_h, a_hs = torch.zeros(fz.shape, dtype=fz.dtype), torch.zeros(z.shape, dtype=fz.dtype)
    for k in range(M):
        def h(y, k=k):
            return (g_loo[k] * (y - sig)).sum(-1)

        for i in range(d):
            flipped = z[k].clone()
            flipped[:, i] = 1 - flipped[:, i]
            p_not = torch.where(z[k, :, i] > 0, 1 - sig[:, i], sig[:, i])  # q(not x_i)
            a_h[k] += p_not * (h(flipped) - h(z[k])) / d
            a_hs[k] += p_not[:, None] * (h(flipped)[:, None] * (flipped - sig) - h(z[k])[:, None] * s[k]) / d
    first = -sum(((a_h.sum(0) - a_h[k]) / (M - 1))[:, None] * s[k] for k in range(M)) / M
    assert torch.allclose(got, _fitted(rloo_part(fz, s), [first, a_hs.mean(0)]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["double-cv-ls", "rodeo-ls"])
def test_the_value_is_each_data_points_mean_of_f(estimator):
    """The estimate's value for data point b is (1/K) sum_k f(z_kb), not a mean over the batch."""
    eta, f, seen = posterior_and_f()
    value = ESTIMATORS[estimator](Bernoulli(eta), f, num_samples=M)
    assert torch.allclose(value, f(seen[0]).mean(0), rtol=1e-12) and value.std() > 0
