"""The gradient-variance routine against a toy estimator whose variance is known in closed form."""
import math

import torch

from discvae.gradients import gradient_samples, gradient_variance, moments
from helpers import tiny_data, tiny_model


def test_known_variance_of_a_toy_estimator():
    """loss = theta . (a + s * eps), eps ~ N(0, I): grad = a + s eps, variance s_i^2 per coordinate, mean a."""
    torch.manual_seed(0)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    r = 20000
    samples = gradient_samples(lambda: (theta * (a + s * torch.randn(4, dtype=torch.float64))).sum(), [theta], r)
    stats = moments(samples)
    true_var = (s**2).mean().item()
    # var of the sample variance of a normal is 2 sigma^4 / (R - 1); average over 4 coordinates
    se_var = math.sqrt((2 * s**4 / (r - 1)).sum().item()) / 4
    assert abs(stats["var"] - true_var) < 5 * se_var
    # E||mean||^2 = ||a||^2 + sum s^2 / R
    assert abs(stats["mean_sq"] - ((a**2).sum() + (s**2).sum() / r).item()) < 5 * math.sqrt(
        (4 * a**2 * s**2 / r).sum().item()) + 1e-6


def test_gradient_variance_of_a_model():
    model, x = tiny_model("bernoulli", 3), tiny_data()
    stats = gradient_variance(model, x, "importance", repeats=8, num_samples=1)
    assert set(stats) == {"encoder_var", "encoder_mean_sq", "decoder_var", "decoder_mean_sq"}
    assert stats["encoder_var"] > 0 and stats["decoder_var"] > 0
    loo = gradient_variance(model, x, "importance", repeats=400, num_samples=4, baseline="loo")
    plain = gradient_variance(model, x, "importance", repeats=400, num_samples=4)
    assert loo["encoder_var"] < plain["encoder_var"]  # the baseline reduces the encoder's variance
