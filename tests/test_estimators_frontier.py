"""``double-cv`` (Titsias & Shi 2022) and ``rodeo`` (Shi et al. 2022): the Gibbs Stein operator against its
definition, unbiasedness against the exact gradient of a tiny enumerable model (with the check's power stated and a
negative control), training from the CLI and the Python API, ``compare`` and the refusal of categoricals."""
import math

import pytest
import torch

from discvae import Config, Dataset, load_dataset, train
from discvae.distributions import Bernoulli
from discvae.estimators import ESTIMATORS, gibbs_stein_linear
from discvae.experiments.compare import Comparison, compare, parse_spec
from helpers import (
    Z_MAX,
    assert_one_line_error,
    exact_expected_ll,
    exact_grad,
    flat_grad,
    run_cli,
    tiny_data,
    tiny_model,
    train_digits,
    z_scores,
)

FRONTIER = ["double-cv-ls", "rodeo-ls"]
R = 3000  # independent gradient estimates per check
N = 16  # data points of the batch: each point's control-variate coefficients are fitted on the other 15
POWER_MARGIN = 2.0  # a bias of (Z_MAX + 2) standard errors exceeds Z_MAX with probability > 97.7 %


def test_gibbs_stein_closed_forms_match_the_definition_and_have_mean_zero():
    """(A u)(x) = (1/D) sum_i q(not x_i) [u(x^(i)) - u(x)] by flipping each bit, for h(y) = gamma . (y - mu) and
    H = h (y - mu); and sum_z q(z) (A u)(z) = 0 over all 2^D states."""
    torch.manual_seed(0)
    d = 4
    q = Bernoulli(torch.randn(d, dtype=torch.float64))
    gamma = torch.randn(d, dtype=torch.float64)
    mu = q.probs

    def h(y):
        return ((y - mu) * gamma).sum(-1)

    def big_h(y):
        return h(y)[..., None] * (y - mu)

    states = q.enumerate()  # [16, 4]
    a_h, a_hs = gibbs_stein_linear(q, states, gamma.expand_as(states))
    batched = gibbs_stein_linear(q, states[:, None].expand(-1, 3, -1), gamma.expand(16, 3, d))  # [K, B, D] as rodeo
    assert torch.allclose(batched[0], a_h[:, None].expand(-1, 3)) and torch.allclose(batched[1], a_hs[:, None])
    for z, ah, ahs in zip(states, a_h, a_hs, strict=True):
        flips = z + torch.eye(d, dtype=z.dtype) * (1 - 2 * z)  # row i: z with bit i flipped
        p_flip = torch.where(z > 0, 1 - mu, mu)
        assert torch.allclose(ah, (p_flip * (h(flips) - h(z))).sum() / d)
        assert torch.allclose(ahs, (p_flip[:, None] * (big_h(flips) - big_h(z))).sum(0) / d)
    weights = q.log_prob(states).exp()
    assert abs((weights * a_h).sum()) < 1e-14 and (weights[:, None] * a_hs).sum(0).abs().max() < 1e-14


def encoder_size(model) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


def centred_grads(model, x, estimator: str, repeats: int, **options) -> torch.Tensor:
    """``repeats`` estimates of grad sum_b E_q[f_b] for the centred f_b(z) = ln p(x_b|z) - E_q ln p(x_b|z) (the mean
    held fixed, so the gradient is unchanged and only the score terms' noise shrinks), ``[repeats, P]``."""
    centre = exact_expected_ll(model, x).detach()
    out = []
    for _ in range(repeats):
        model.zero_grad()
        ESTIMATORS[estimator](model.posterior(x), lambda z: model.log_likelihood(x, z) - centre,
                              **options).sum().backward()
        out.append(flat_grad(model))
    return torch.stack(out)


def detectable_relative_bias(samples: torch.Tensor, truth: torch.Tensor) -> float:
    """The smallest eps such that an estimator with mean (1 + eps) truth (the same noise) has some coordinate at
    Z_MAX + POWER_MARGIN standard errors from the truth: the check then fails with probability > 97.7 %."""
    se = samples.std(0) / samples.shape[0] ** 0.5
    return ((Z_MAX + POWER_MARGIN) / (truth.abs() / se).max()).item()


@pytest.mark.parametrize("estimator,num_samples", [("double-cv-ls", 2), ("rodeo-ls", 2), ("rodeo-ls", 3)])
def test_unbiased_against_enumeration_with_stated_power(estimator, num_samples):
    """Encoder and decoder gradients match the exact one (every |z| < Z_MAX); the check would catch a relative bias
    of the encoder gradient of at most 10 %, and does catch the estimate's encoder part times 1.1."""
    model, x = tiny_model("bernoulli", 3), tiny_data(N)
    truth = exact_grad(model, x)
    torch.manual_seed(6)
    grads = centred_grads(model, x, estimator, R, num_samples=num_samples)
    z = z_scores(grads, truth)
    assert z.abs().max() < Z_MAX, z
    enc = encoder_size(model)
    eps = detectable_relative_bias(grads[:, :enc], truth[:enc])
    assert eps <= 0.10, eps
    biased = grads.clone()
    biased[:, :enc] *= 1.1  # negative control: a 10 % too large encoder gradient
    assert z_scores(biased, truth).abs().max() > Z_MAX


@pytest.mark.parametrize("estimator", FRONTIER)
def test_a_batch_of_one_has_no_coefficient_to_fit_and_is_rloo(estimator):
    """The coefficients of a data point are fitted on the batch's others: with none they are 0, leaving rloo."""
    model, x = tiny_model("bernoulli", 3), tiny_data(1)
    grads = []
    for name in (estimator, "rloo"):
        torch.manual_seed(7)
        model.zero_grad()
        ESTIMATORS[name](model.posterior(x), lambda z: model.log_likelihood(x, z), num_samples=3).sum().backward()
        grads.append(flat_grad(model))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("estimator", FRONTIER)
def test_value_is_the_mean_of_f_and_torch_distributions_are_accepted(estimator):
    eta = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64, requires_grad=True)
    seen = []

    def f(z):
        seen.append(z.detach())
        return (z * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum(-1) ** 2

    value = ESTIMATORS[estimator](torch.distributions.Bernoulli(logits=eta), f, num_samples=3)
    assert len(seen) == 1 and seen[0].shape == (3, 1, 3)  # K evaluations of f, in one call
    assert torch.allclose(value, f(seen[0]).mean(0))
    value.sum().backward()
    assert torch.isfinite(eta.grad).all()


@pytest.mark.parametrize("estimator", FRONTIER)
def test_trains_on_digits_from_the_cli(tmp_path, estimator):
    run = train_digits(tmp_path / "run", "--estimator", estimator, "--num-samples", "2")
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2
    header, values = rows[0].split(","), rows[1].split(",")
    assert math.isfinite(float(values[header.index("train_neg_elbo")]))


def small_digits() -> Dataset:
    d = load_dataset("digits")
    return Dataset(d.name, d.x_train[:512], d.y_train[:512], d.x_test[:128], d.y_test[:128])


@pytest.mark.parametrize("estimator", FRONTIER)
def test_trains_from_the_python_api(tmp_path, estimator):
    cfg = Config(dataset="digits", latent_dim=8, epochs=1, batch_size=64, estimator=estimator,
                 estimator_options={"num_samples": 2}, out=str(tmp_path / "run"))
    state = train(cfg, progress=False, data=small_digits())
    assert state.step == 8 and math.isfinite(state.history[-1]["train_neg_elbo"])


def test_compare_reports_them(tmp_path):
    base = Config(dataset="digits", latent_dim=6, epochs=0, batch_size=128)
    specs = [parse_spec(s, 2) for s in [*FRONTIER, "rloo"]]
    results = compare(base, specs, Comparison(out=tmp_path, bias_epochs=0, bias_batch=16, bias_repeats=8),
                      data=small_digits())
    report = (tmp_path / "report.md").read_text()
    rows = {r["label"]: r for r in results["bias_variance"]}
    for name in FRONTIER:
        assert f"| {name} |" in report and rows[name]["evals_per_point"] == 2
        assert math.isfinite(rows[name]["encoder_var"])


@pytest.mark.parametrize("estimator", FRONTIER)
def test_categorical_and_single_sample_are_refused_in_one_line(tmp_path, capsys, estimator):
    common = ("train", "--dataset", "digits", "--estimator", estimator, "--out", tmp_path / "run", "--quiet")
    code, _, err = run_cli(capsys, *common, "--latent", "categorical", "--num-samples", "2")
    assert_one_line_error(code, err, f"{estimator} needs a bernoulli latent")
    code, _, err = run_cli(capsys, *common, "--num-samples", "1")
    assert_one_line_error(code, err, "at least 2")
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize("estimator", FRONTIER)
def test_two_evaluations_of_f_by_default(estimator):
    """Without ``num_samples`` each data point gets M = 2 evaluations of f, the least these estimators take."""
    seen = []
    eta = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    ESTIMATORS[estimator](Bernoulli(eta), lambda z: seen.append(z.shape) or z.sum(-1))
    assert seen == [(2, 4, 3)]
