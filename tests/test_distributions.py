"""Latent families against torch.distributions and against enumeration."""
import math

import pytest
import torch
import torch.distributions as td

from discvae.distributions import Bernoulli, Categorical, Gaussian
from discvae.errors import InputError

torch.manual_seed(0)
ETA = torch.randn(5, 6, dtype=torch.float64) * 3


def test_bernoulli_matches_torch():
    q, ref = Bernoulli(ETA), td.Bernoulli(logits=ETA)
    z = q.sample(4)
    assert z.shape == (4, 5, 6) and set(z.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(q.log_prob(z), ref.log_prob(z).sum(-1))
    assert torch.allclose(q.entropy(), ref.entropy().sum(-1))
    prior = td.Bernoulli(probs=torch.full_like(ETA, 0.5))
    assert torch.allclose(q.kl_to_prior(), td.kl_divergence(ref, prior).sum(-1))


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_categorical_matches_torch(groups):
    q = Categorical(ETA, groups)
    ref = td.OneHotCategorical(logits=ETA.unflatten(-1, (groups, 6 // groups)))
    z = q.sample(4)
    assert z.shape == (4, 5, 6)
    assert torch.equal(z.unflatten(-1, (groups, 6 // groups)).sum(-1), torch.ones(4, 5, groups, dtype=z.dtype))
    assert torch.allclose(q.log_prob(z), ref.log_prob(z.unflatten(-1, (groups, -1))).sum(-1))
    assert torch.allclose(q.entropy(), ref.entropy().sum(-1))
    prior = td.OneHotCategorical(logits=torch.zeros_like(ref.logits))
    assert torch.allclose(q.kl_to_prior(), td.kl_divergence(ref, prior).sum(-1))


def test_gaussian_matches_torch():
    q = Gaussian(ETA)
    mu, logvar = ETA.chunk(2, -1)
    ref = td.Normal(mu, (0.5 * logvar).exp())
    z = q.rsample(3)
    assert torch.allclose(q.log_prob(z), ref.log_prob(z).sum(-1))
    assert torch.allclose(q.entropy(), ref.entropy().sum(-1))
    prior = td.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(q.kl_to_prior(), td.kl_divergence(ref, prior).sum(-1))
    assert torch.allclose(q.prior_log_prob(z), prior.log_prob(z).sum(-1))


@pytest.mark.parametrize("q", [Bernoulli(ETA[:, :4]), Categorical(ETA, 1), Categorical(ETA, 2)],
                         ids=["bernoulli", "categorical", "categorical-2-groups"])
def test_enumeration_agrees(q):
    states = q.enumerate()[:, None, :]
    assert len(states.unique(dim=0)) == len(states)
    logq = q.log_prob(states)
    assert torch.allclose(torch.logsumexp(logq, 0), torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(q.entropy(), -(logq.exp() * logq).sum(0))
    kl = (logq.exp() * (logq - q.prior_log_prob(states))).sum(0)
    assert torch.allclose(q.kl_to_prior(), kl)
    assert torch.allclose(torch.logsumexp(q.prior_log_prob(states), 0), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("make", [lambda e: Bernoulli(e), lambda e: Categorical(e, 2)], ids=["bernoulli", "cat"])
def test_sampling_frequencies(make):
    q = make(ETA[:2] / 3)
    n = 40000
    freq = q.sample(n).mean(0)
    se = (q.mean * (1 - q.mean) / n).sqrt()
    assert ((freq - q.mean).abs() / se).max() < 5


@pytest.mark.parametrize("make", [lambda e: Bernoulli(e), lambda e: Categorical(e, 2)], ids=["bernoulli", "cat"])
def test_stable_for_large_natural_parameters(make):
    eta = torch.tensor([[50.0, -50.0, 0.0, 49.0], [-50.0, 50.0, 20.0, -20.0]], requires_grad=True)
    q = make(eta)
    z = q.sample(3)
    for value in (q.log_prob(z), q.entropy(), q.kl_to_prior()):
        assert torch.isfinite(value).all()
    assert (q.entropy() >= 0).all() and (q.kl_to_prior() >= -1e-5).all()
    (q.log_prob(z).sum() + q.kl_to_prior().sum()).backward()
    assert torch.isfinite(eta.grad).all()


def test_entropy_is_bounded_by_the_uniform():
    assert torch.allclose(Bernoulli(torch.zeros(7)).entropy(), torch.tensor(7 * math.log(2)))
    assert torch.allclose(Categorical(torch.zeros(100)).entropy(), torch.tensor(math.log(100)))


def test_refuses_to_enumerate_huge_spaces():
    with pytest.raises(InputError, match="too many"):
        Bernoulli(torch.zeros(50)).enumerate()
    with pytest.raises(InputError, match="groups"):
        Categorical(torch.zeros(7), 2)
