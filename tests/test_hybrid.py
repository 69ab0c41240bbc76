"""Hybrid latents (discrete blocks beside a Gaussian): the spec, the unbiased gradient against enumeration and
Gauss-Hermite quadrature, per-block KL and capacity, and the commands on a hybrid run."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from discvae.distributions import Categorical, Gaussian, Joint
from discvae.errors import InputError
from discvae.estimators import make_estimator
from discvae.latents import LatentSpace
from discvae.training import Config, objective
from helpers import Z_MAX, assert_one_line_error, flat_grad, run_cli, tiny_data, tiny_model, train_digits

HERMITE_NODES = 80  # f is analytic in the Gaussian coordinate (a tanh network): quadrature error far below 1e-9


def exact_hybrid_loss(model, x) -> torch.Tensor:
    """KL - E_q[ln p(x|z)], batch mean, the expectation exact: the discrete blocks enumerated, the one Gaussian
    dimension integrated by Gauss-Hermite quadrature, int N(z; mu, s^2) g(z) dz = sum_j w_j g(mu + s sqrt2 t_j) /
    sqrt(pi)."""
    q = model.posterior(x)
    q_d, (gauss,) = q.discrete_part, [part for _, part in q.parts if not part.discrete]
    t, w = (torch.from_numpy(a) for a in np.polynomial.hermite.hermgauss(HERMITE_NODES))
    z_c = gauss.loc + (0.5 * gauss.logvar).exp() * math.sqrt(2) * t[:, None, None]  # [J, B, 1]
    states = q_d.enumerate()  # [S, dim_d]
    z = q.join(states[:, None, None, :], z_c[None])  # [S, J, B, dim]
    s, j, b = z.shape[:3]
    f = model.log_likelihood(x, z.reshape(s * j, b, -1)).reshape(s, j, b)
    probs = q_d.log_prob(states[:, None, :]).exp()  # [S, B]
    expected_ll = (probs[:, None, :] * (w / math.sqrt(math.pi))[None, :, None] * f).sum((0, 1))
    return (q.kl_to_prior() - expected_ll).mean()


def grad_of(model, loss) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return flat_grad(model)


HYBRIDS = [("categorical:3+gaussian:1", "exact", {}), ("categorical:3+gaussian:1", "rloo", {"num_samples": 2}),
           ("categorical:3+gaussian:1", "importance", {}), ("gaussian:1+bernoulli:2", "disarm", {"num_samples": 2}),
           ("bernoulli:2+gaussian:1", "exact", {})]


@pytest.mark.parametrize("latent,estimator,options", HYBRIDS)
def test_hybrid_gradient_is_unbiased(latent, estimator, options):
    """Every parameter's gradient (encoder: both blocks; decoder) against the exact one, R = 2000 estimates, each
    coordinate within Z_MAX standard errors (see helpers.Z_MAX for the family-wise error)."""
    model, x = tiny_model(latent), tiny_data()
    truth = grad_of(model, exact_hybrid_loss(model, x))
    est = make_estimator(estimator, **options)
    torch.manual_seed(4)
    grads = torch.stack([grad_of(model, model(x, est).loss) for _ in range(2000)])
    mean, se = grads.mean(0), grads.std(0) / len(grads) ** 0.5
    z = (mean - truth) / se
    assert (se > 0).all()  # the Gaussian draw makes every coordinate random
    assert z.abs().max() < Z_MAX, z


def test_the_check_detects_a_missing_pathwise_gradient():
    """Negative control: detaching the Gaussian sample (no reparameterisation gradient) must fail the check."""
    model, x = tiny_model("categorical:3+gaussian:1"), tiny_data()
    truth = grad_of(model, exact_hybrid_loss(model, x))
    exact = make_estimator("exact")
    torch.manual_seed(4)

    grads = []
    for _ in range(500):
        q = model.posterior(x)
        q_d, f = q.estimand(lambda z: model.log_likelihood(x, z.detach()))
        loss = (q.kl_to_prior() - exact(q_d, f)).mean()
        grads.append(grad_of(model, loss))
    grads = torch.stack(grads)
    z = (grads.mean(0) - truth) / (grads.std(0) / len(grads) ** 0.5).clamp_min(1e-12)
    assert z.abs().max() > Z_MAX


def test_exact_sums_the_categorical_with_one_gaussian_draw():
    """M2 / GMVAE-style: ``exact`` decodes each class with the same z_c; with z_c fixed its value is
    sum_k q(k) f(e_k, z_c) exactly."""
    model, x = tiny_model("categorical:4+gaussian:2"), tiny_data()
    q = model.posterior(x)
    seen = []
    torch.manual_seed(0)
    q_d, f = q.estimand(lambda z: seen.append(z) or model.log_likelihood(x, z))
    value = make_estimator("exact")(q_d, f)
    (z,) = seen
    assert z.shape == (4, len(x), 6)
    assert torch.equal(z[..., :4], torch.eye(4, dtype=z.dtype)[:, None, :].expand(4, len(x), 4))
    assert torch.equal(z[0, :, 4:], z[3, :, 4:])  # one Gaussian draw per data point, shared by the classes
    expected = (q_d.probs[:, 0, :].T * model.log_likelihood(x, z)).sum(0)
    assert torch.allclose(value, expected)


def test_latent_space_parsing():
    space = LatentSpace.parse("categorical:10x2+gaussian:8")
    assert str(space) == "categorical:10x2+gaussian:8"
    assert (space.param_dim, space.dim, space.num_states) == (20 + 16, 28, None)
    assert space.code_block.family is Categorical and space.code_block.groups == 2
    assert LatentSpace.parse("bernoulli", 12).num_states == 4096
    assert str(LatentSpace.parse("categorical", 10, 3)) == "categorical:10x3"
    q = space.posterior(torch.zeros(5, space.param_dim))
    assert isinstance(q, Joint) and [n for n, _ in q.parts] == ["categorical", "gaussian"]
    assert isinstance(q.parts[1][1], Gaussian) and q.sample((3,)).shape == (3, 5, 28)
    for bad, match in (("categorical:10+", "is not one of"), ("beta:3", "is not one of"),
                       ("bernoulli:3x2", "groups applies"), ("categorical:1+gaussian:2", "too small"),
                       ("bernoulli:3+bernoulli:4", "repeats a family"), ("categorical:10+normal:4", "is not one of")):
        with pytest.raises(InputError, match=match):
            LatentSpace.parse(bad)
    with pytest.raises(InputError, match="leave out latent_dim"):
        LatentSpace.parse("categorical:10+gaussian:4", 10)


def test_capacity_objective_and_its_checks():
    cfg = Config(latent="categorical:10+gaussian:4", capacity={"categorical": [2.0, 100]}, capacity_gamma=10.0)
    cfg.check()
    assert cfg.capacities(50) == {"categorical": 1.0} and cfg.capacities(500) == {"categorical": 2.0}
    model, x = tiny_model("categorical:10+gaussian:4"), tiny_data()
    torch.manual_seed(0)
    terms = model(x, make_estimator("exact"))
    kl_cat, kl_gauss = terms.kl_blocks["categorical"], terms.kl_blocks["gaussian"]
    assert torch.allclose(terms.kl, kl_cat + kl_gauss)
    expected = -terms.expected_ll + kl_gauss + 10.0 * (kl_cat - 1.0).abs()
    assert torch.allclose(objective(terms, cfg, 50), expected)
    assert torch.equal(objective(terms, Config(latent="categorical:10+gaussian:4"), 50), terms.loss)
    for capacity, match in (({"bernoulli": [1.0, 10]}, "has the blocks categorical, gaussian"),
                            ({"gaussian": [1.0, 0]}, "C_max >= 0 nats, steps >= 1"),
                            ({"gaussian": [-1.0, 10]}, "C_max >= 0")):
        with pytest.raises(InputError, match=match):
            Config(latent="categorical:10+gaussian:4", capacity=capacity).check()


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "h"
    return train_digits(out, "--latent", "categorical:10+gaussian:4", "--estimator", "exact", "--epochs", "2",
                        "--capacity", "categorical=2.3:10", "--capacity-gamma", "5")


def test_a_hybrid_run_logs_each_block_and_is_evaluated_per_block(hybrid_run, capsys):
    rows = list(csv.DictReader(open(hybrid_run / "metrics.csv")))
    assert len(rows) == 2
    for split in ("train", "test"):
        total = float(rows[-1][f"{split}_kl"])
        parts = float(rows[-1][f"{split}_kl_categorical"]) + float(rows[-1][f"{split}_kl_gaussian"])
        assert total == pytest.approx(parts, rel=1e-6)
    config = json.loads((hybrid_run / "config.json").read_text())
    assert config["latent"] == "categorical:10+gaussian:4" and config["capacity"] == {"categorical": [2.3, 10]}
    code, _, err = run_cli(capsys, "evaluate", hybrid_run, "--k", "20")
    assert code == 0, err
    result = json.loads((hybrid_run / "eval.json").read_text())["test"]
    assert 1 <= result["categorical_used_categories"] <= 10
    assert {"categorical_unit_information_bits", "gaussian_active_units", "iwae"} <= set(result)
    assert "exact_log_px" not in result  # a Gaussian block cannot be enumerated


def test_hybrid_figures_and_clustering(hybrid_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plot", hybrid_run, "--out", tmp_path / "fig", "--n", "6")
    assert code == 0, err
    written = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {"h-classes.png", "h-traversal.png", "h-units.png"} <= written and "h-templates.png" not in written
    code, _, err = run_cli(capsys, "clustering", hybrid_run, "--out", tmp_path / "cl")
    assert code == 0, err
    result = json.loads((tmp_path / "cl" / "clustering.json").read_text())
    assert 0 <= result["runs"]["h"]["acc_one_to_one"] <= 1 and result["runs"]["h"]["clusters"] == 10


def test_bad_hybrid_flags_are_one_line_errors(tmp_path, capsys):
    for argv, match in ((["--latent", "categorical:10+normal"], "is not one of"),
                        (["--latent", "categorical:10+gaussian:4", "--groups", "2"], "leave out --latent-dim"),
                        (["--latent", "categorical:10+gaussian:4", "--capacity", "poisson=1:10"], "has the blocks"),
                        (["--latent", "categorical:10+gaussian:4", "--capacity", "categorical=x"], "BLOCK=CMAX:STEPS")):
        try:
            code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--epochs", "1", "--out", tmp_path / "r",
                                   *argv)
        except SystemExit as exit_:  # argparse
            code, err = exit_.code, capsys.readouterr().err
        assert_one_line_error(code, err, match)
        assert not (tmp_path / "r").exists()
