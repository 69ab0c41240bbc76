"""The mixture prior (``--prior mixture``): a categorical y beside a Gaussian z, p(y) p(z|y) = (1/c) N(z; mu_y, I)
with learned means, the decoder reading z; ``--prior mixture-var``: N(z; mu_y, diag sigma_y^2), the variances
learned too. Their KL and ln p(z) against torch.distributions, their gradients against the exact one (y summed, z by
Gauss-Hermite quadrature), errors, and runs through the commands."""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.distributions as td

from discvae.distributions import Mixture
from discvae.errors import InputError
from discvae.estimators import make_estimator
from discvae.latents import LatentSpace
from helpers import Z_MAX, assert_one_line_error, flat_grad, run_cli, tiny_data, tiny_model, train_digits

HERMITE_NODES = 80


@pytest.mark.parametrize("prior", ["mixture", "mixture-var"])
def test_kl_and_prior_match_torch_distributions(prior):
    space = LatentSpace.parse("categorical:4+gaussian:3", prior=prior)
    assert (space.param_dim, space.dim, space.num_states, space.mixture) == (4 + 6, 3, None, True)
    module = space.prior_module()
    if prior == "mixture-var":  # learned variances away from 1, so that each term that reads them is checked
        with torch.no_grad():
            module.logvars.copy_(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    params = torch.randn(5, space.param_dim, generator=torch.Generator().manual_seed(0))
    q = space.posterior(params, module)
    assert isinstance(q, Mixture) and q.sample((2,)).shape == (2, 5, 3) and q.code().shape == (5, 1)
    means, scales = module.means.detach(), (0.5 * module.logvars.detach()).exp()
    q_y = td.Categorical(logits=params[:, :4])
    q_z = td.Normal(params[:, 4:7], (0.5 * params[:, 7:]).exp())
    kl_z = torch.stack([td.kl_divergence(q_z, td.Normal(means[y], scales[y])).sum(-1) for y in range(4)], -1)
    parts = q.kl_parts()
    uniform = td.Categorical(logits=torch.zeros(4))
    assert torch.allclose(parts["categorical"], td.kl_divergence(q_y, uniform), atol=1e-6)
    assert torch.allclose(parts["gaussian"], (q_y.probs * kl_z).sum(-1), atol=1e-5)
    assert torch.allclose(q.kl_to_prior(), parts["categorical"] + parts["gaussian"])
    mixture = td.MixtureSameFamily(td.Categorical(logits=torch.zeros(4)), td.Independent(td.Normal(means, scales), 1))
    z = torch.randn(7, 5, 3)
    assert torch.allclose(q.prior_log_prob(z), mixture.log_prob(z), atol=1e-5)
    assert torch.allclose(q.log_prob(z), q_z.log_prob(z).sum(-1), atol=1e-5)
    assert q.prior_sample((6,)).shape == (6, 3)
    assert torch.allclose(q.join(torch.eye(4), torch.zeros(3)), means)  # a class's prior mean
    assert torch.allclose(q.join(torch.eye(4), torch.ones(3)), means + scales)  # one prior deviation from it


def test_prior_draws_have_each_class_s_variance():
    """mixture-var's p(z) draws: class y's draws scatter around mu_y with standard deviation sigma_y."""
    space = LatentSpace.parse("categorical:2+gaussian:1", prior="mixture-var")
    module = space.prior_module()
    with torch.no_grad():
        module.means.copy_(torch.tensor([[-100.0], [100.0]]))
        module.logvars.copy_(torch.tensor([[math.log(4.0)], [math.log(0.25)]]))
    torch.manual_seed(0)
    z = space.posterior(torch.zeros(1, space.param_dim), module).prior_sample(20000)[:, 0]
    left, right = z[z < 0], z[z > 0]
    assert 9000 < len(left) < 11000  # p(y) uniform: 10000 +- 5 standard deviations (71)
    # the sample standard deviation of n normal draws has standard error sigma / sqrt(2 n): 5 of them
    for draws, mean, sd in ((left, -100.0, 2.0), (right, 100.0, 0.5)):
        assert abs(draws.mean().item() - mean) < 5 * sd / len(draws) ** 0.5
        assert abs(draws.std().item() - sd) < 5 * sd / (2 * len(draws)) ** 0.5


def exact_mixture_loss(model, x) -> torch.Tensor:
    """KL - E_q[ln p(x|z)], batch mean: the KL in closed form (y summed), the expectation over the one Gaussian
    dimension by Gauss-Hermite quadrature, int N(z; mu, s^2) g(z) dz = sum_j w_j g(mu + s sqrt2 t_j) / sqrt(pi)."""
    q = model.posterior(x)
    gauss = q.parts[1][1]
    t, w = (torch.from_numpy(a) for a in np.polynomial.hermite.hermgauss(HERMITE_NODES))
    z = gauss.loc + (0.5 * gauss.logvar).exp() * math.sqrt(2) * t[:, None, None]  # [J, B, 1]
    expected_ll = ((w / math.sqrt(math.pi))[:, None] * model.log_likelihood(x, z)).sum(0)
    return (q.kl_to_prior() - expected_ll).mean()


def grad_of(model, loss) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return flat_grad(model)


@pytest.mark.parametrize("prior", ["mixture", "mixture-var"])
def test_gradient_is_unbiased_prior_means_included(prior):
    """Every parameter's gradient (encoder: both blocks; decoder; the prior's means and, with mixture-var, its
    log-variances) against the exact one, R = 2000 estimates, each coordinate within Z_MAX standard errors
    (helpers.Z_MAX); the categorical's logits and the prior's parameters, which only the closed-form KL reaches,
    have a gradient with no variance from the categorical."""
    model, x = tiny_model("categorical:3+gaussian:1", prior=prior), tiny_data()
    assert model.decoder[0].in_features == 1 and model.prior.means.shape == (3, 1)
    learned = [model.prior.means, *([model.prior.logvars] if prior == "mixture-var" else [])]
    if prior == "mixture-var":
        with torch.no_grad():
            model.prior.logvars.copy_(torch.tensor([[0.5], [-0.7], [0.2]]))
    assert all(a is b for a, b in zip(list(model.parameters())[-len(learned):], learned, strict=True))  # last
    n = 3 * len(learned)
    truth = grad_of(model, exact_mixture_loss(model, x))
    est = make_estimator("reparam")
    torch.manual_seed(4)
    grads = torch.stack([grad_of(model, model(x, est).loss) for _ in range(2000)])
    mean, se = grads.mean(0), grads.std(0) / len(grads) ** 0.5
    z = (mean - truth) / se.clamp_min(1e-12)
    assert z.abs().max() < Z_MAX, z
    assert (truth[-n:] != 0).all() and torch.allclose(grads[:, -n:], truth[-n:].expand(len(grads), n))


def test_the_mixture_needs_a_categorical_and_a_gaussian(tmp_path, capsys):
    for bad in ("bernoulli:3+gaussian:2", "categorical:3x2+gaussian:2", "gaussian:2+categorical:3", "categorical"):
        with pytest.raises(InputError, match="prior mixture needs a latent categorical:C\\+gaussian:K"):
            LatentSpace.parse(bad, prior="mixture")
    with pytest.raises(InputError, match="unknown prior 'vamp'"):
        LatentSpace.parse("categorical:3+gaussian:2", prior="vamp")
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--latent", "bernoulli:4+gaussian:2", "--prior",
                           "mixture", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "--prior mixture needs a latent categorical:C+gaussian:K")


def test_a_mixture_run_trains_clusters_and_is_drawn(tmp_path, capsys):
    run = train_digits(tmp_path / "m", "--latent", "categorical:10+gaussian:4", "--prior", "mixture",
                       "--estimator", "reparam", "--epochs", "2")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    total = float(rows[-1]["test_kl"])
    assert total == pytest.approx(float(rows[-1]["test_kl_categorical"]) + float(rows[-1]["test_kl_gaussian"]))
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert state["prior.means"].shape == (10, 4) and "prior.logvars" not in state  # unit variances, not saved
    assert run_cli(capsys, "clustering", run, "--out", tmp_path / "c")[0] == 0
    assert run_cli(capsys, "evaluate", run, "--k", "10")[0] == 0
    result = json.loads((run / "eval.json").read_text())["test"]
    assert result["iwae"] > -result["neg_elbo"] and 1 <= result["categorical_used_categories"] <= 10
    assert run_cli(capsys, "plot", run)[0] == 0
    assert (run / "m-classes.png").exists() and (run / "m-traversal.png").exists()
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--epochs", "3", "--quiet")
    assert code == 0, err


def test_a_mixture_var_run_learns_its_variances_and_loads(tmp_path, capsys):
    run = train_digits(tmp_path / "v", "--latent", "categorical:10+gaussian:4", "--prior", "mixture-var",
                       "--estimator", "reparam", "--epochs", "1")
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert state["prior.logvars"].shape == (10, 4) and (state["prior.logvars"] != 0).any()  # moved from 0
    assert run_cli(capsys, "evaluate", run, "--k", "10")[0] == 0
    assert run_cli(capsys, "plot", run)[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--prior", "mixture", "--epochs", "2")
    assert_one_line_error(code, err, "--resume continues the saved configuration; cannot change --prior")
