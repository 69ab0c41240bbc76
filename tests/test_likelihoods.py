"""Observation models against torch's own implementations, and the binarisation modes."""
import pytest
import torch
import torch.nn.functional as F

from discvae.errors import InputError
from discvae.likelihoods import BernoulliLikelihood, GaussianLikelihood, binarize

torch.manual_seed(0)
X = torch.rand(4, 10, dtype=torch.float64)
LOGITS = torch.randn(3, 4, 10, dtype=torch.float64) * 5


def test_bernoulli_is_minus_binary_cross_entropy_on_grey_values():
    ref = -F.binary_cross_entropy_with_logits(LOGITS, X.expand_as(LOGITS), reduction="none").sum(-1)
    assert torch.allclose(BernoulliLikelihood.log_prob(X, LOGITS), ref)


def test_gaussian_is_unit_variance_normal_around_the_sigmoid_mean():
    ref = torch.distributions.Normal(torch.sigmoid(LOGITS), 1.0).log_prob(X).sum(-1)
    assert torch.allclose(GaussianLikelihood.log_prob(X, LOGITS), ref)


def test_bernoulli_stable_for_extreme_logits():
    logits = torch.tensor([[[100.0, -100.0]]])
    x = torch.tensor([[1.0, 0.0]])
    assert torch.allclose(BernoulliLikelihood.log_prob(x, logits), torch.zeros(1, 1), atol=1e-6)


def test_binarize_modes():
    x = torch.full((20000,), 0.3)
    assert torch.equal(binarize(x, "none"), x)
    assert torch.equal(binarize(torch.tensor([0.2, 0.5, 0.7]), "threshold"), torch.tensor([0.0, 0.0, 1.0]))
    d = binarize(x, "dynamic", torch.Generator().manual_seed(0))
    assert set(d.unique().tolist()) == {0.0, 1.0}
    assert abs(d.mean().item() - 0.3) < 5 * (0.3 * 0.7 / 20000) ** 0.5
    assert torch.equal(d, binarize(x, "dynamic", torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="unknown binarization"):
        binarize(x, "otsu")
