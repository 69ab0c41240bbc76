"""The estimators beyond the paper's (vimco's value, exact, the relaxations) against exact values and gradients
obtained by enumerating every latent state (and, for vimco, every pair of states) of a tiny model; the unbiased
estimators' gradients, with power, are in test_unbiasedness."""
import pytest
import torch

from discvae.distributions import Bernoulli, Categorical
from discvae.errors import InputError
from discvae.estimators import ESTIMATORS, exact
from helpers import (
    Z_MAX,
    estimated_grads,
    exact_expected_ll,
    exact_grad,
    exact_iwae,
    flat_grad,
    tiny_data,
    tiny_model,
    z_scores,
)

R = 2000  # independent gradient estimates per check (the helper's Z_MAX assumes R >= 1000)
BERNOULLI, CATEGORICAL = ("bernoulli", 3, 1), ("categorical", 3, 2)


def encoder_size(model) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


@pytest.mark.parametrize("latent", [BERNOULLI, CATEGORICAL, ("categorical", 5, 1)])
def test_exact_equals_enumeration_to_float_precision(latent):
    model, x = tiny_model(*latent), tiny_data()
    truth = exact_grad(model, x)
    model.zero_grad()
    value = exact(model.posterior(x), lambda z: model.log_likelihood(x, z), num_samples=7)
    value.sum().backward()
    assert torch.allclose(value, exact_expected_ll(model, x), rtol=1e-13, atol=0)
    assert torch.allclose(flat_grad(model), truth, rtol=1e-12, atol=1e-13)


def test_exact_decodes_each_state_once_for_the_whole_batch():
    q = Categorical(torch.randn(64, 10))
    shapes = []
    exact(q, lambda z: shapes.append(z.shape) or torch.zeros(z.shape[0], 64))
    assert shapes == [(10, 1, 10)]


def test_vimco_value_is_the_iwae_bound_plus_kl():
    model, x = tiny_model("bernoulli", 2), tiny_data()
    n = 20000
    torch.manual_seed(6)
    with torch.no_grad():
        xs = x.repeat(n, 1)
        values = ESTIMATORS["vimco"](model.posterior(xs), lambda z: model.log_likelihood(xs, z), num_samples=2)
        truth = exact_iwae(model, x)
    values = values.reshape(n, len(x))
    z = (values.mean(0) - truth) / (values.std(0) / n**0.5)
    assert z.abs().max() < Z_MAX, z


@pytest.mark.parametrize("estimator,options,latent,min_rel_bias", [
    ("gumbel", {"tau": 1.0}, BERNOULLI, 0.1),          # measured: 22% of the encoder gradient's norm
    ("gumbel", {"tau": 1.0}, ("categorical", 3, 1), 0.5),  # measured: 90%
    ("st-gumbel", {"tau": 1.0}, BERNOULLI, 0.2),       # measured: 42%
    ("straight-through", {}, ("categorical", 3, 1), 0.5),  # measured: 120%
])
def test_biased_estimators_are_detectably_biased(estimator, options, latent, min_rel_bias):
    """The relaxed and straight-through estimators miss the encoder gradient by a large fraction of its norm,
    far outside the standard error of R = 2000 estimates (the size is recorded, the direction has no fixed sign)."""
    model, x = tiny_model(*latent), tiny_data()
    truth = exact_grad(model, x)
    torch.manual_seed(7)
    grads = estimated_grads(model, x, estimator, R, num_samples=1, **options)
    n_enc = encoder_size(model)
    rel = (grads.mean(0) - truth)[:n_enc].norm() / truth[:n_enc].norm()
    assert z_scores(grads, truth).abs().max() > 3 * Z_MAX
    assert rel > min_rel_bias, rel


@pytest.mark.parametrize("latent", [BERNOULLI, ("categorical", 3, 1)])
def test_relaxed_objective_converges_to_the_expectation_as_tau_goes_to_zero(latent):
    """E[f(z~)] -> E_q[f(z)] as tau -> 0: the bias of gumbel's *value* is significant at tau = 1, shrinks with tau
    and is within noise at tau = 0.03 (20000 samples). (Its gradient's expectation converges too, but the variance
    grows like 1/tau, so that claim needs far more samples than a unit test can afford.)"""
    model, x = tiny_model(*latent), tiny_data()
    truth = exact_expected_ll(model, x).detach()
    n, biases = 20000, []
    xs = x.repeat(n, 1)
    for tau in (1.0, 0.3, 0.1, 0.03):
        torch.manual_seed(8)
        with torch.no_grad():
            values = ESTIMATORS["gumbel"](model.posterior(xs), lambda z: model.log_likelihood(xs, z), tau=tau)
        values = values.reshape(n, len(x))
        biases.append(((values.mean(0) - truth).abs().max().item(), (values.std(0) / n**0.5).max().item()))
    assert biases[0][0] > 2 * Z_MAX * biases[0][1]
    assert biases[0][0] > biases[1][0] > biases[2][0]
    assert biases[3][0] < Z_MAX * biases[3][1]


@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
@pytest.mark.parametrize("estimator", ["gumbel", "st-gumbel"])
def test_relaxations_are_finite_at_low_temperature_in_float32(family, estimator):
    torch.manual_seed(9)
    logits = (torch.randn(64, 12) * 30).clamp(-50, 50)
    logits[0, :6] = torch.tensor([50.0, -50.0, 50.0, -50.0, 0.0, 50.0])
    logits.requires_grad_(True)
    q = Bernoulli(logits) if family == "bernoulli" else Categorical(logits, groups=3)
    w = torch.randn(12)
    value = ESTIMATORS[estimator](q, lambda z: (z * w).sum(-1) - (z - 0.5).pow(2).sum(-1), num_samples=4, tau=0.1)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("q", [Bernoulli(torch.tensor([[1.5, -0.5, 0.0]])),
                               Categorical(torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5, 0.5]]), groups=2)])
def test_hard_relaxed_sample_is_an_exact_sample_and_soft_tends_to_it(q):
    torch.manual_seed(10)
    soft, hard = q.relaxed_sample(40000, tau=0.05)
    freq, se = hard.mean(0), hard.std(0) / 40000**0.5
    assert ((freq - q.mean).abs() < Z_MAX * se + 1e-12).all()
    assert (soft - hard).abs().mean() < 0.05


@pytest.mark.parametrize("estimator,options,latent,match", [
    ("disarm", {"num_samples": 2}, "categorical", "bernoulli"),
    ("disarm", {"num_samples": 3}, "bernoulli", "even"),
    ("vimco", {"num_samples": 1}, "bernoulli", "at least 2"),
    ("rloo", {"num_samples": 1}, "bernoulli", "at least 2"),
    ("gumbel", {"tau": 0.0}, "bernoulli", "positive"),
    ("gumbel", {}, "gaussian", "bernoulli or categorical"),
    ("straight-through", {}, "gaussian", "bernoulli or categorical"),
    ("exact", {}, "gaussian", "bernoulli or categorical"),
])
def test_bad_options_are_clear_input_errors(estimator, options, latent, match):
    model, x = tiny_model(latent, 4), tiny_data()
    with pytest.raises(InputError, match=match):
        ESTIMATORS[estimator](model.posterior(x), lambda z: model.log_likelihood(x, z), **options)


def test_exact_refuses_more_than_4096_states():
    for q in (Bernoulli(torch.zeros(2, 13)), Categorical(torch.zeros(2, 40), groups=4)):  # 8192 and 10^4 states
        with pytest.raises(InputError, match="limit is 4096"):
            exact(q, lambda z: z.sum(-1))
    for q, mean in ((Bernoulli(torch.zeros(2, 12)), 6.0), (Categorical(torch.zeros(2, 36), groups=3), 3.0)):
        assert torch.allclose(exact(q, lambda z: z.sum(-1).expand(-1, 2)), torch.full((2,), mean, dtype=torch.float32))


@pytest.mark.parametrize("estimator,options,latent,message,params", [
    ("disarm", {}, ("categorical", 3), "disarm needs a bernoulli latent (use rloo or exact for categoricals)", ()),
    *[(name, {}, ("categorical", 3), f"{name} needs a bernoulli latent (use rloo or exact for categoricals)", ())
      for name in ("double-cv-ls", "rodeo-ls")],
    ("disarm", {"num_samples": 3}, ("bernoulli", 3), "disarm needs an even num_samples (2 per antithetic pair), got 3",
     ("num_samples",)),
    *[(name, {"num_samples": 1}, ("bernoulli", 3), f"{name} needs num_samples of at least 2, got 1", ("num_samples",))
      for name in ("rloo", "vimco", "double-cv-ls", "rodeo-ls")],
    ("gumbel", {"tau": 0.0}, ("bernoulli", 3), "the temperature tau must be positive, got 0.0", ("tau",)),
    ("st-gumbel", {}, ("gaussian", 2), "relaxed estimators need a bernoulli or categorical latent", ()),
    ("importance", {"baseline": "median"}, ("bernoulli", 3), "unknown baseline 'median'; choose one of none, mean, "
                                                             "loo", ()),
    ("exact", {}, ("gaussian", 2), "exact needs a bernoulli or categorical latent", ()),
    ("straight-through", {}, ("gaussian", 2), "straight-through needs a bernoulli or categorical latent", ()),
    ("exact", {}, ("bernoulli", 13), "exact would sum over 8.19e+03 latent states; the limit is 4096 (e.g. one "
                                     "categorical of up to 4096 classes, or at most 12 bits)", ()),
])
def test_input_errors_say_what_is_wrong_in_full(estimator, options, latent, message, params):
    """The whole message, and the parameters it names (which the CLI renames to their flags: --num-samples)."""
    model, x = tiny_model(*latent), tiny_data()
    with pytest.raises(InputError) as err:
        ESTIMATORS[estimator](model.posterior(x), lambda z: model.log_likelihood(x, z), **options)
    assert str(err.value) == message and err.value.params == params


def test_disarm_draws_one_antithetic_pair_by_default():
    model, x = tiny_model("bernoulli", 3), tiny_data()
    shapes = []
    ESTIMATORS["disarm"](model.posterior(x), lambda z: shapes.append(z.shape) or model.log_likelihood(x, z))
    assert shapes == [(2, 3, 3)]


@pytest.mark.parametrize("name,reference,options,latent,m", [
    ("importance", "importance", {"num_samples": 1, "proposal": None, "baseline": "none"}, BERNOULLI, 1),
    ("rloo", "importance", {"num_samples": 2, "baseline": "loo"}, BERNOULLI, 2),  # rloo is importance's loo
    ("disarm", "disarm", {"num_samples": 2}, BERNOULLI, 2),
    ("vimco", "vimco", {"num_samples": 2}, BERNOULLI, 2),
    ("gumbel", "gumbel", {"num_samples": 1, "tau": 1.0}, BERNOULLI, 1),
    ("st-gumbel", "st-gumbel", {"num_samples": 1, "tau": 1.0}, BERNOULLI, 1),
    ("straight-through", "straight-through", {"num_samples": 1}, BERNOULLI, 1),
    ("reparam", "reparam", {"num_samples": 1}, ("gaussian", 2, 1), 1),
])
def test_defaults_are_the_documented_ones(name, reference, options, latent, m):
    """Called with no options, each estimator decodes its documented number of samples M and gives the value and
    gradient of its documented defaults (the same random draws)."""
    model, x = tiny_model(*latent), tiny_data()

    def run(estimator, **kwargs):
        model.zero_grad()
        torch.manual_seed(3)
        seen = []
        f = lambda z: seen.append(z.shape[0]) or model.log_likelihood(x, z)  # noqa: E731
        value = ESTIMATORS[estimator](model.posterior(x), f, **kwargs)
        value.sum().backward()
        return value.detach(), flat_grad(model), seen

    default, documented = run(name), run(reference, **options)
    assert torch.equal(default[0], documented[0]) and torch.equal(default[1], documented[1])
    assert default[2] == [m]


@pytest.mark.parametrize("m", [2, 6])
def test_disarm_value_is_the_mean_over_its_pairs(m):
    """The surrogate's value is (f(b) + f(b')) / 2 averaged over the pairs (its score term has value 0)."""
    model, x = tiny_model("bernoulli", 3), tiny_data()
    seen = []
    value = ESTIMATORS["disarm"](model.posterior(x), lambda z: seen.append(model.log_likelihood(x, z)) or seen[-1],
                                 num_samples=m)
    assert seen[0].shape == (m, 3) and torch.allclose(value, seen[0].mean(0), rtol=1e-14, atol=0)


@pytest.mark.parametrize("estimator", ["st-gumbel", "straight-through"])
def test_straight_through_forward_passes_decode_exact_samples(estimator):
    """The forward pass decodes exact samples z ~ q (0/1 bits): the value is the mean of f over them, one per data
    point; with f linear, straight-through's gradient w.r.t. eta is exactly a * dE_q[z]/d eta."""
    eta = torch.tensor([[0.3, -1.2, 2.0], [1.0, 0.0, -0.5]], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    seen = []
    value = ESTIMATORS[estimator](Bernoulli(eta), lambda z: seen.append(z.detach()) or (z * a).sum(-1),
                                  num_samples=4)
    z = seen[0]
    assert value.shape == (2,) and torch.allclose(z, z.round(), atol=1e-12) and z.shape == (4, 2, 3)
    assert torch.allclose(value, (z * a).sum(-1).mean(0))
    if estimator == "straight-through":
        value.sum().backward()
        p = torch.sigmoid(eta.detach())
        assert torch.allclose(eta.grad, a * p * (1 - p))
