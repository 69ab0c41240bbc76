"""The learned factorised prior (``--prior learned``): p(z) = Bernoulli(sigmoid(lambda)) for bits, softmax(lambda_g)
per categorical group, lambda learned (zeros at the start). Its KL, ln p(z) and samples against torch.distributions,
the gradient of every parameter (the prior's included) against the exact one, ln p(x) by enumeration, its errors,
and a run through the commands."""
import csv
import json

import pytest
import torch
import torch.distributions as td

from discvae.estimators import make_estimator
from discvae.evaluation import exact_log_likelihood, iwae_bound
from discvae.latents import LatentSpace
from helpers import Z_MAX, assert_one_line_error, flat_grad, run_cli, tiny_data, tiny_model, train_digits, z_scores


def random_prior(space):
    prior = space.prior_module()
    with torch.no_grad():
        for logits in prior.logits.values():
            logits.copy_(2 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)))
    return prior


def test_kl_log_prob_and_samples_match_torch_distributions():
    torch.manual_seed(0)
    params = torch.randn(5, 4 + 6 + 4)
    space = LatentSpace.parse("bernoulli:4+categorical:3x2+gaussian:2", prior="learned")
    prior = random_prior(space)
    assert set(prior.logits) == {"bernoulli", "categorical"} and prior.logits["categorical"].shape == (6,)
    q = space.posterior(params, prior)
    lam_b, lam_c = prior.logits["bernoulli"].detach(), prior.logits["categorical"].detach().view(2, 3)
    p_b = td.Independent(td.Bernoulli(logits=lam_b.expand(5, 4)), 1)  # torch's KL needs equal batch shapes
    p_c = td.Independent(td.OneHotCategorical(logits=lam_c.expand(5, 2, 3)), 1)
    q_b = td.Independent(td.Bernoulli(logits=params[:, :4]), 1)
    q_c = td.Independent(td.OneHotCategorical(logits=params[:, 4:10].view(5, 2, 3)), 1)
    q_g = td.Independent(td.Normal(params[:, 10:12], (0.5 * params[:, 12:]).exp()), 1)
    parts = q.kl_parts()
    assert torch.allclose(parts["bernoulli"], td.kl_divergence(q_b, p_b), atol=1e-5)
    assert torch.allclose(parts["categorical"], td.kl_divergence(q_c, p_c), atol=1e-5)
    assert torch.allclose(parts["gaussian"], td.kl_divergence(q_g, td.Independent(td.Normal(0.0, torch.ones(2)), 1)))
    z = q.sample((7,))
    expected = p_b.log_prob(z[..., :4]) + p_c.log_prob(z[..., 4:10].view(7, 5, 2, 3)) + td.Independent(
        td.Normal(0.0, torch.ones(2)), 1).log_prob(z[..., 10:])
    assert torch.allclose(q.prior_log_prob(z), expected, atol=1e-5)
    # samples of the prior: each bit's and class's frequency within 5 standard errors of its probability
    n = 20000
    freq = q.prior_sample((n,))[:, :10].mean(0)
    probs = torch.cat([torch.sigmoid(lam_b), torch.softmax(lam_c, -1).flatten()])
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-4).all(), (freq, probs)


def test_the_learned_prior_is_a_distribution_and_starts_uniform():
    for spec, size, groups in (("bernoulli", 5, 1), ("categorical", 3, 2)):
        space = LatentSpace.parse(spec, size, groups, prior="learned")
        params = torch.randn(4, space.param_dim)
        standard = LatentSpace.parse(spec, size, groups).posterior(params)
        q = space.posterior(params, space.prior_module())  # zeros: the uniform prior
        states = q.enumerate()[:, None, :]
        assert torch.allclose(q.kl_to_prior(), standard.kl_to_prior(), atol=1e-6)
        assert torch.allclose(q.prior_log_prob(states), standard.prior_log_prob(states))
        q = space.posterior(params, random_prior(space))
        assert torch.logsumexp(q.prior_log_prob(states), 0).abs().max() < 1e-5  # sums to one over the states
        kl = (q.log_prob(states).exp() * (q.log_prob(states) - q.prior_log_prob(states))).sum(0)
        assert torch.allclose(q.kl_to_prior(), kl, atol=1e-5)  # the closed form against the sum over states


def exact_loss(model, x) -> torch.Tensor:
    """KL - E_q[ln p(x|z)] by enumerating every z, p(z) from torch.distributions: batch mean."""
    q = model.posterior(x)
    states = q.enumerate()[:, None, :]
    log_q = q.log_prob(states)
    log_p = td.Independent(td.Bernoulli(logits=model.prior.logits["bernoulli"]), 1).log_prob(states)
    return -(log_q.exp() * (model.log_likelihood(x, states) + log_p - log_q)).sum(0).mean()


def grad_of(model, loss) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return flat_grad(model)


def test_gradients_prior_included_against_the_exact_one():
    """``exact`` gives the gradient of every parameter to 1e-10; ``disarm``, R = 2000 estimates, each coordinate
    within Z_MAX standard errors (helpers.Z_MAX), the prior's logits (reached by the closed-form KL only) exactly."""
    model, x = tiny_model("bernoulli", 3, prior="learned"), tiny_data()
    with torch.no_grad():
        model.prior.logits["bernoulli"].copy_(torch.tensor([1.5, -2.0, 0.3]))
    truth = grad_of(model, exact_loss(model, x))
    prior_grad = truth[-3:]  # the prior's logits are the model's last parameters
    assert model.prior.logits["bernoulli"] is list(model.parameters())[-1] and (prior_grad.abs() > 1e-3).all()
    assert torch.allclose(grad_of(model, model(x, make_estimator("exact")).loss), truth, atol=1e-10)
    torch.manual_seed(5)
    grads = torch.stack([grad_of(model, model(x, make_estimator("disarm")).loss) for _ in range(2000)])
    assert z_scores(grads, truth).abs().max() < Z_MAX
    assert torch.allclose(grads[:, -3:], prior_grad.expand(len(grads), 3), atol=1e-12)


def test_log_likelihood_and_iwae_use_the_learned_prior():
    model, x = tiny_model("bernoulli", 3, prior="learned"), tiny_data()
    with torch.no_grad():
        model.prior.logits["bernoulli"].copy_(torch.tensor([2.5, -2.0, 0.3]))
    states = model.posterior(x).enumerate()[:, None, :]
    log_p = td.Independent(td.Bernoulli(logits=model.prior.logits["bernoulli"]), 1).log_prob(states)
    truth = torch.logsumexp(model.log_likelihood(x, states) + log_p, 0)
    uniform = torch.logsumexp(model.log_likelihood(x, states), 0) - 3 * torch.log(torch.tensor(2.0))
    assert (truth - uniform).abs().max() > 0.4  # the prior matters here
    assert torch.allclose(exact_log_likelihood(model, x), truth)
    torch.manual_seed(0)
    for max_states in (0, 8):  # each sample decoded, or looked up in the table of the 8 states
        bound = iwae_bound(model, x, k=20000, max_states=max_states)  # below ln p(x), within 0.03 here
        assert (bound < truth + 0.01).all() and (bound > truth - 0.05).all(), (bound, truth)


def test_a_learned_prior_run_learns_it_and_resumes(tmp_path, capsys):
    run = train_digits(tmp_path / "p", "--prior", "learned", "--estimator", "disarm", "--num-samples", "2",
                       "--epochs", "3")
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert state["prior.logits.bernoulli"].shape == (8,) and state["prior.logits.bernoulli"].abs().max() > 1e-3
    assert run_cli(capsys, "evaluate", run, "--k", "10")[0] == 0
    result = json.loads((run / "eval.json").read_text())["test"]
    assert result["iwae"] > -result["neg_elbo"]
    assert run_cli(capsys, "plot", run)[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--epochs", "4", "--quiet")
    assert code == 0, err
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 4


def test_a_learned_prior_needs_a_discrete_block(tmp_path, capsys):
    with pytest.raises(Exception, match="prior learned needs a latent with a discrete block"):
        LatentSpace.parse("gaussian", 3, prior="learned")
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--latent", "gaussian", "--prior", "learned",
                           "--estimator", "reparam", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "prior learned needs a latent with a discrete block")
