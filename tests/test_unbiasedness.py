"""Every estimator claimed unbiased against the exact gradient from enumerating every latent state of a tiny model,
with the power of the check stated and asserted: R = 20000 vectorised replicas of a centred f, so a relative bias
of 10 % of the encoder (or decoder) gradient is caught with probability >= 95 %, and realistic defects (x0.9,
x1.1, noise of the same variance) fail while a correct estimator passes (``helpers.assert_unbiased_with_power``).

Adding an estimator is one line of ``UNBIASED``: (name, options, latent); ``"fixed"`` as the proposal stands for
natural parameters xi != eta, different per coordinate; one that needs more replicas for 10 % sets them in
``REPLICAS``; an estimator unbiased for another objective than E_q[f]
maps its name to that objective's exact gradient in ``OBJECTIVES``."""
import pytest
import torch

from helpers import (
    Z_MAX,
    assert_unbiased_with_power,
    exact_expected_ll,
    exact_grad,
    flat_grad,
    iwae_grad,
    replica_grads,
    tiny_data,
    tiny_model,
    z_scores,
)

R = 20000
REPLICAS = {"vimco": 180_000}  # its encoder gradient is small against its noise: 10 % needs 9x the replicas
BITS, CLASSES, GROUPS = ("bernoulli", 3, 1), ("categorical", 4, 1), ("categorical", 3, 2)
OBJECTIVES = {"vimco": iwae_grad}
UNBIASED = [
    *[("importance", {"num_samples": 2, "proposal": proposal, "baseline": baseline}, latent)
      for latent in (BITS, CLASSES, GROUPS) for proposal in ("posterior", "uniform", "fixed")
      for baseline in ("none", "mean", "loo")],
    ("importance", {"num_samples": 1}, BITS),  # the paper's estimator with its defaults
    ("rloo", {"num_samples": 2}, BITS),
    ("rloo", {"num_samples": 3}, GROUPS),
    ("disarm", {"num_samples": 2}, BITS),
    ("disarm", {"num_samples": 4}, BITS),
    ("double-cv", {"num_samples": 2}, BITS),
    ("rodeo", {"num_samples": 2}, BITS),
    ("vimco", {"num_samples": 2}, ("bernoulli", 2, 1)),
    ("vimco", {"num_samples": 2}, ("categorical", 3, 1)),
]


def case_id(case) -> str:
    name, options, latent = case
    return "-".join([name, *map(str, latent), *(f"{k}={v}" for k, v in options.items())])


@pytest.mark.parametrize("estimator,options,latent", UNBIASED, ids=map(case_id, UNBIASED))
def test_unbiased_with_stated_power(estimator, options, latent):
    model, x = tiny_model(*latent), tiny_data()
    if options.get("proposal") == "fixed":
        options = {**options, "proposal": torch.linspace(-1.0, 1.0, model.space.param_dim, dtype=torch.float64)}
    truth = OBJECTIVES.get(estimator, exact_grad)(model, x)
    torch.manual_seed(11)
    grads = replica_grads(model, x, estimator, REPLICAS.get(estimator, R), **options)
    assert_unbiased_with_power(grads, truth, sum(p.numel() for p in model.encoder.parameters()))


@pytest.mark.parametrize("latent", [("bernoulli", 2, 1), ("categorical", 3, 1)])
def test_vimco_is_not_unbiased_for_the_elbo(latent):
    """vimco's estimates are far from the gradient of E_q[f] + KL (a different objective than its IWAE bound)."""
    model, x = tiny_model(*latent), tiny_data()
    model.zero_grad()
    (exact_expected_ll(model, x) + model.posterior(x).kl_to_prior()).sum().backward()
    elbo = flat_grad(model)
    torch.manual_seed(12)
    assert z_scores(replica_grads(model, x, "vimco", R, num_samples=2), elbo).abs().max() > 3 * Z_MAX
