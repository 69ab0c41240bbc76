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
    ("double-cv-ls", {"num_samples": 2}, BITS),
    ("rodeo-ls", {"num_samples": 2}, BITS),
    ("arm", {"num_samples": 2}, BITS),
    ("arm", {"num_samples": 4}, BITS),
    ("arms", {"num_samples": 2}, BITS),
    ("arms", {"num_samples": 3}, BITS),
    ("arms", {"num_samples": 5}, BITS),
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


# the estimators with learned state: at their initial state and with every parameter and buffer moved to arbitrary
# values (a control variate must leave the estimate unbiased whatever it has learned), in training mode (their own
# gradient must not reach the model); nvil without its variance normalisation (a positive rescaling, tested in
# test_learned.py). Moved, nvil's baseline and REBAR's and RELAX's control variate are far from what they would learn,
# and their variance grows: 10 % needs more replicas there (MOVED_REPLICAS).
LEARNED = [("nvil", {"num_samples": 1, "normalise": False}), ("nvil", {"num_samples": 2, "normalise": False}),
           ("rebar", {"num_samples": 1}), ("relax", {"num_samples": 1}), ("double-cv", {"num_samples": 2}),
           ("rodeo", {"num_samples": 2}), ("rodeo", {"num_samples": 3})]
MOVED_REPLICAS = {"nvil": 100_000, "rebar": 50_000, "relax": 100_000}


def moved(estimator, seed: int):
    """``estimator`` after a first call has sized it, with every parameter and floating buffer set to arbitrary
    values: scalars (coefficients, scale, log temperature, running mean) N(0, 1), a running variance |N(0, 1)| + 0.5,
    a network's weights N(0, 1 / fan_in) and biases N(0, 1 / 4) -- weights of a trained network's size."""
    from discvae.distributions import Bernoulli
    estimator(Bernoulli(torch.zeros(1, BITS[1])), lambda z: z.sum(-1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*estimator.named_parameters(), *estimator.named_buffers()]:
            value = torch.randn(t.shape, generator=g, dtype=t.dtype)
            scale = t.shape[-1] ** -0.5 if t.dim() == 2 else 0.5 if t.dim() == 1 else 1.0
            t.copy_(value.abs() + 0.5 if name == "var" else value * scale)
    return estimator


@pytest.mark.parametrize("state", ["initial", "moved"])
@pytest.mark.parametrize("estimator,options", LEARNED, ids=[case_id((n, o, BITS)) for n, o in LEARNED])
def test_learned_unbiased_at_any_state(estimator, options, state):
    from discvae import make_estimator
    model, x = tiny_model(*BITS), tiny_data()
    est = make_estimator(estimator, **options)
    if state == "moved":
        moved(est, seed=len(estimator) + options["num_samples"])
    truth = exact_grad(model, x)
    torch.manual_seed(13)
    grads = replica_grads(model, x, est, MOVED_REPLICAS.get(estimator, R) if state == "moved" else R)
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
