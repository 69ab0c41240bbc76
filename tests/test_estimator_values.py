"""Estimators as values: a user's own estimator through the model and ``train``, ``make_estimator``'s checks, errors
worded for Python, torch.distributions posteriors, and torch's ``sample_shape`` convention."""
import json

import pytest
import torch
import torch.distributions as td

from discvae import Config, Dataset, InputError, load_dataset, train
from discvae.cli import flag
from discvae.distributions import Bernoulli, Categorical, Gaussian, as_family
from discvae.estimators import ESTIMATORS, Estimator, importance, make_estimator, rloo, sample_baseline, st_gumbel
from helpers import run_cli, tiny_data, tiny_model


def score_function(q, f, num_samples: int = 1) -> torch.Tensor:
    """Plain Monte Carlo with the score-function gradient: (1/M) sum_m f(z_m) + sg(f(z_m)) grad ln q(z_m)."""
    z = q.sample((num_samples,))
    fz, log_q = f(z), q.log_prob(z)
    return (fz + fz.detach() * (log_q - log_q.detach())).mean(0)


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_a_users_estimator_runs_through_the_model():
    """The score-function estimator above is the paper's importance estimator with xi = eta: same value, same
    gradient from the same draws."""
    model, x = tiny_model("bernoulli", 3), tiny_data()
    results = []
    for estimator in (score_function, importance, make_estimator(score_function, num_samples=3)):
        torch.manual_seed(0)
        model.zero_grad()
        terms = model(x, estimator, num_samples=3)
        terms.loss.backward()
        results.append((terms.neg_elbo, grads(model)))
    for value, grad in results[1:]:
        assert torch.allclose(value, results[0][0], rtol=1e-12) and torch.allclose(grad, results[0][1], rtol=1e-10)


def small_digits() -> Dataset:
    d = load_dataset("digits")
    return Dataset(d.name, d.x_train[:256], d.y_train[:256], d.x_test[:64], d.y_test[:64])


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_train_takes_a_users_estimator_and_records_its_name(tmp_path):
    data = small_digits()
    cfg = dict(dataset="digits", latent_dim=6, epochs=1, batch_size=64, grad_var_every=1, grad_var_repeats=2,
               estimator_options={"num_samples": 2})
    mine = train(Config(**cfg, out=str(tmp_path / "mine")), progress=False, data=data, estimator=score_function)
    ref = train(Config(**cfg, out=str(tmp_path / "ref")), progress=False, data=data)
    assert torch.allclose(params(mine.model), params(ref.model), atol=1e-6)
    saved = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert saved["estimator"] == f"{__name__}.score_function" and saved["estimator_options"] == {"num_samples": 2}
    resumed = train(Config(**{**cfg, "epochs": 2}, out=str(tmp_path / "mine")), resume=True, progress=False,
                    data=data, estimator=score_function)
    assert resumed.epoch == 2
    with pytest.raises(InputError, match=f"unknown estimator '{__name__}.score_function'"):
        train(Config.from_dict({**saved, "epochs": 3}), resume=True, progress=False, data=data)


def test_make_estimator_binds_checked_options():
    est = make_estimator("rloo", num_samples=4)
    assert isinstance(est, Estimator) and est == make_estimator(rloo, num_samples=4)
    assert repr(est) == "rloo(num_samples=4)"
    two = make_estimator("importance", num_samples=2, baseline="loo")
    assert repr(two) == "importance(num_samples=2, baseline='loo')"
    assert make_estimator(st_gumbel).name == "st-gumbel"
    assert make_estimator(score_function).name == f"{__name__}.score_function"
    assert make_estimator(est, num_samples=6).options == {"num_samples": 6}  # an Estimator is rebound
    model, x = tiny_model("bernoulli", 3), tiny_data()
    q, f = model.posterior(x), lambda z: model.log_likelihood(x, z)
    torch.manual_seed(1)
    a = est(q, f)
    torch.manual_seed(1)
    assert torch.equal(a, rloo(q, f, num_samples=4))


@pytest.mark.parametrize("estimator,options,match", [
    ("reinforce", {}, "unknown estimator 'reinforce'; choose one of " + ", ".join(ESTIMATORS)),
    ("rloo", {"baseline": "loo"}, "estimator rloo takes no option 'baseline' (it takes num_samples)"),
    ("exact", {"tau": 0.5}, "estimator exact takes no option 'tau' (it takes num_samples)"),
    ("gumbel", {"beta": 1}, "estimator gumbel takes no option 'beta' (it takes num_samples, tau)"),
    (lambda q, f: f(q.sample(1)).mean(0), {"beta": 1}, "takes no option 'beta' (it takes none)"),
    (lambda q, f, *, beta: f(q.sample(1)).mean(0), {}, "missing a required argument: 'beta'"),
    (3, {}, "an estimator is a registered name or a function"),
])
def test_make_estimator_rejects_unknown_names_and_options(estimator, options, match):
    with pytest.raises(InputError) as err:
        make_estimator(estimator, **options)
    assert match in str(err.value)


def test_library_errors_name_parameters_and_the_cli_names_flags(tmp_path, capsys):
    with pytest.raises(InputError) as err:
        make_estimator("rloo", baseline="loo")
    assert err.value.renamed(flag) == "estimator rloo takes no option '--baseline' (it takes --num-samples)"
    model, x = tiny_model("bernoulli", 3), tiny_data()
    for estimator, options, message in [(rloo, {"num_samples": 1}, "rloo needs num_samples of at least 2, got 1"),
                                        (importance, {"baseline": "loo"}, "the loo baseline needs num_samples of "
                                         "at least 2"),
                                        ("gumbel", {"tau": 0.0}, "the temperature tau must be positive, got 0.0")]:
        with pytest.raises(InputError) as err:
            model(x, estimator, **options)
        assert str(err.value) == message and "--" not in str(err.value)
    with pytest.raises(InputError, match="^num_samples must be an integer"):
        Config(estimator_options={"num_samples": 0}).check()
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--estimator", "rloo", "--num-samples", "2",
                           "--baseline", "loo", "--out", tmp_path / "run", "--quiet")
    assert code == 2 and "estimator rloo takes no option '--baseline' (it takes --num-samples)" in err
    assert not (tmp_path / "run").exists()


def broken(q, f, num_samples: int = 1):
    raise TypeError("a genuine bug")


def test_a_type_error_inside_an_estimator_stays_a_type_error(tmp_path):
    model, x = tiny_model("bernoulli", 3), tiny_data()
    with pytest.raises(TypeError, match="a genuine bug"):
        model(x, broken)
    with pytest.raises(TypeError, match="a genuine bug"):
        train(Config(dataset="digits", latent_dim=4, epochs=1, out=str(tmp_path / "run")), progress=False,
              data=small_digits(), estimator=broken)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# torch.distributions posteriors: same value and gradient as the discvae family, same draws

W = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
X = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def f(z: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for ln p(x|z): z ``[M, B or 1, 6]`` -> ``[M, 4]``."""
    return -(torch.tanh(z @ W) - X).pow(2).sum(-1)


def bernoulli_pair(eta):
    return Bernoulli(eta), td.Bernoulli(logits=eta)


def one_hot_pair(eta):
    return Categorical(eta), td.OneHotCategorical(logits=eta)


def two_groups_pair(eta):
    return Categorical(eta, groups=2), td.OneHotCategorical(logits=eta.unflatten(-1, (2, 3)))


def normal_pair(params):
    loc, logvar = params.chunk(2, -1)
    return Gaussian(params), td.Independent(td.Normal(loc, (0.5 * logvar).exp()), 1)


DISCRETE = [("importance", {"num_samples": 3}), ("importance", {"num_samples": 2, "proposal": "uniform",
                                                                "baseline": "loo"}),
            ("rloo", {"num_samples": 2}), ("vimco", {"num_samples": 3}), ("exact", {}),
            ("gumbel", {"num_samples": 2, "tau": 0.5}), ("st-gumbel", {"num_samples": 2}),
            ("straight-through", {"num_samples": 2})]
CASES = [(name, options, pair) for name, options in DISCRETE for pair in (bernoulli_pair, one_hot_pair,
                                                                             two_groups_pair)]
CASES += [("disarm", {"num_samples": 4}, bernoulli_pair), ("reparam", {"num_samples": 2}, normal_pair)]


@pytest.mark.parametrize("name,options,pair", CASES, ids=[f"{c[0]}-{c[2].__name__}" for c in CASES])
def test_torch_distributions_give_the_same_surrogate_and_gradient(name, options, pair):
    eta = torch.randn(4, 6 if pair is not normal_pair else 12, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(2))
    results = []
    for which in (0, 1):
        leaf = eta.clone().requires_grad_(True)
        q = pair(leaf)[which]
        torch.manual_seed(3)
        value = make_estimator(name, **options)(q, f)
        value.sum().backward()
        results.append((value.detach(), leaf.grad))
    (value, grad), (torch_value, torch_grad) = results
    assert torch.allclose(torch_value, value, rtol=1e-10) and torch.allclose(torch_grad, grad, rtol=1e-8, atol=1e-12)
    assert grad.abs().sum() > 0


def test_as_family_conversions():
    eta = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    q = as_family(td.Independent(td.Bernoulli(logits=eta), 1))
    assert isinstance(q, Bernoulli) and torch.equal(q.logits, eta)
    grouped = as_family(td.OneHotCategorical(logits=eta.unflatten(-1, (3, 2))))
    assert isinstance(grouped, Categorical) and (grouped.groups, grouped.classes) == (3, 2)
    assert torch.allclose(grouped.log_probs, torch.log_softmax(eta.unflatten(-1, (3, 2)), -1))
    p = torch.full((2, 3), 0.25, requires_grad=True)
    as_family(td.Bernoulli(probs=p)).entropy().sum().backward()  # gradients reach probs-parameterised posteriors
    assert p.grad is not None and p.grad.abs().sum() > 0
    own = Bernoulli(eta)
    assert as_family(own) is own


@pytest.mark.parametrize("q,match", [(td.Poisson(torch.ones(2, 3)), "not Poisson"),
                                     (td.Categorical(logits=torch.zeros(2, 3)), "not Categorical"),
                                     (td.Independent(td.Bernoulli(logits=torch.zeros(2, 3, 4)), 2),
                                      r"not Independent\(Bernoulli"),
                                     (torch.zeros(2, 3), "not Tensor")])
def test_other_posteriors_are_clear_input_errors(q, match):
    with pytest.raises(InputError, match=match):
        importance(q, f)


def test_disarm_on_a_torch_one_hot_says_it_needs_bits():
    with pytest.raises(InputError, match="disarm needs a bernoulli latent"):
        make_estimator("disarm")(td.OneHotCategorical(logits=torch.zeros(4, 6)), f)


# torch's sample_shape convention

ETA = torch.randn(4, 6)
DRAWS = [(q, method) for q in (Bernoulli(ETA), Categorical(ETA, 2)) for method in ("sample", "relaxed_sample",
                                                                                    "prior_sample")]
DRAWS += [(Gaussian(ETA), method) for method in ("sample", "rsample", "prior_sample")]


def draws(q, method: str, sample_shape) -> tuple:
    """Every tensor one call of ``q.method(sample_shape)`` returns (``relaxed_sample``: soft and hard, tau = 1/2)."""
    out = q.relaxed_sample(sample_shape, 0.5) if method == "relaxed_sample" else getattr(q, method)(sample_shape)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("q,method", DRAWS, ids=[f"{type(q).__name__}-{m}" for q, m in DRAWS])
def test_sample_shape_as_in_torch_and_an_int_means_one_axis(q, method):
    event = (q.dim,) if method == "prior_sample" else (*q.mean.shape,)
    torch.manual_seed(0)
    by_int = draws(q, method, 3)
    torch.manual_seed(0)
    for a, b in zip(by_int, draws(q, method, (3,)), strict=True):
        assert a.shape == (3, *event) and torch.equal(a, b)
    for shape in ((), torch.Size(), (2, 3)):
        assert all(t.shape == (*shape, *event) for t in draws(q, method, shape))
    if method != "relaxed_sample":
        assert getattr(q, method)().shape == event


def test_a_callable_object_is_named_by_its_class_and_loo_errors_name_num_samples():
    class Scaled:
        def __call__(self, q, f, num_samples: int = 1):
            return rloo(q, f, 2)

    assert make_estimator(Scaled()).name == f"{__name__}.{Scaled.__qualname__}"
    model, x = tiny_model("bernoulli", 3), tiny_data()
    with pytest.raises(InputError) as err:
        importance(model.posterior(x), lambda z: model.log_likelihood(x, z), baseline="loo")
    assert err.value.params == ("num_samples",)


def test_the_baselines_are_the_means_of_the_other_samples():
    fz = torch.tensor([[1.0, 0.0], [2.0, 3.0], [6.0, 3.0]])  # [M = 3, B = 2]
    assert torch.equal(sample_baseline(fz, "loo"), torch.tensor([[4.0, 3.0], [3.5, 1.5], [1.5, 1.5]]))
    assert torch.equal(sample_baseline(fz, "mean"), (fz.sum() - fz) / 5)
    assert sample_baseline(fz, "none") == 0.0 and sample_baseline(fz[:1, :1], "mean") == 0.0
    assert torch.equal(sample_baseline(fz[:1], "mean"), torch.tensor([[0.0, 1.0]]))  # two lone samples: each the other


@pytest.mark.parametrize("name", sorted(set(ESTIMATORS) - {"reparam", "exact"}))
def test_every_bit_estimator_stays_finite_on_saturated_logits(name):
    """Logits far past float32's saturation (sigma(eta) rounds to 0 or 1) give a finite surrogate and gradient: a
    trained model's bits are there (an earlier arms divided 0 by 0)."""
    eta = torch.tensor([[-120.0, -30.0, -17.0, 0.0, 17.0, 30.0, 120.0]] * 3, requires_grad=True)
    f = lambda z: -(z - 0.3).pow(2).sum(-1)  # noqa: E731 (differentiable in z, for the control variates)
    torch.manual_seed(0)
    value = make_estimator(name, num_samples=2)(Bernoulli(eta), f)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(eta.grad).all(), name
