"""The consistency and balance terms (``--consistency``, ``--balance``): the families' KL to each other and their
batch marginals against torch.distributions, the random transformation's geometry, the terms and their gradients,
their checks, and a run that resumes bit for bit."""
import csv
import math

import pytest
import torch
import torch.distributions as td

from discvae import Config, Dataset, load_dataset, train
from discvae.augmentation import AUGMENT, random_affine
from discvae.distributions import Bernoulli, Categorical, Joint
from discvae.errors import InputError
from discvae.estimators import make_estimator
from discvae.training import objective
from helpers import assert_one_line_error, run_cli, tiny_data, tiny_model


def test_kl_between_posteriors_matches_torch():
    torch.manual_seed(0)
    a, b = torch.randn(4, 6, dtype=torch.float64) * 3, torch.randn(4, 6, dtype=torch.float64) * 3
    a[0, 0], b[0, 1] = 60.0, -60.0  # saturated bits: log space keeps the KL finite and exact
    bits = Bernoulli(a).kl(Bernoulli(b))
    expected = td.kl_divergence(td.Bernoulli(logits=a), td.Bernoulli(logits=b)).sum(-1)
    assert torch.allclose(bits, expected, rtol=1e-9, atol=1e-9)
    classes = Categorical(a, groups=2).kl(Categorical(b, groups=2))  # two groups of 3 classes
    grouped = td.kl_divergence(td.Categorical(logits=a.reshape(4, 2, 3)), td.Categorical(logits=b.reshape(4, 2, 3)))
    assert torch.allclose(classes, grouped.sum(-1), rtol=1e-9, atol=1e-12)
    joint = Joint([("bernoulli", Bernoulli(a[:, :2])), ("categorical", Categorical(a[:, 2:]))])
    other = Joint([("bernoulli", Bernoulli(b[:, :2])), ("categorical", Categorical(b[:, 2:]))])
    assert torch.allclose(joint.kl(other), Bernoulli(a[:, :2]).kl(Bernoulli(b[:, :2]))
                          + Categorical(a[:, 2:]).kl(Categorical(b[:, 2:])))
    assert torch.all(Bernoulli(a).kl(Bernoulli(a)).abs() < 1e-12)


def test_the_batch_marginal_and_its_kl_to_the_prior():
    torch.manual_seed(1)
    a = torch.randn(5, 6, dtype=torch.float64) * 4
    a[0, 0] = 80.0  # saturated: still exact in log space
    bits = Bernoulli(a).aggregate()
    assert torch.allclose(bits.probs, torch.sigmoid(a).mean(0), rtol=1e-12)
    uniform = td.Bernoulli(probs=torch.full((6,), 0.5, dtype=torch.float64))
    assert torch.allclose(bits.kl_to_prior(), td.kl_divergence(td.Bernoulli(probs=torch.sigmoid(a).mean(0)),
                                                               uniform).sum())
    classes = Categorical(a, groups=2).aggregate()  # two groups of 3 classes
    mean = torch.softmax(a.reshape(5, 2, 3), -1).mean(0)
    assert torch.allclose(classes.probs, mean, rtol=1e-12)
    assert torch.allclose(classes.kl_to_prior(), (mean * (mean * 3).log()).sum())
    joint = Joint([("bernoulli", Bernoulli(a[:, :2])), ("categorical", Categorical(a[:, 2:]))]).aggregate()
    assert torch.allclose(joint.kl_to_prior(), Bernoulli(a[:, :2]).aggregate().kl_to_prior()
                          + Categorical(a[:, 2:]).aggregate().kl_to_prior())
    even = Categorical(torch.eye(4, dtype=torch.float64) * 50)  # four confident, different classes: q_bar uniform
    assert even.aggregate().kl_to_prior().abs() < 1e-12 and even.kl_to_prior().mean() > 1.3


def test_the_balance_term_in_the_terms_and_the_objective():
    model, x = tiny_model("categorical:3+gaussian:1"), tiny_data(n=5)
    terms = model(x, make_estimator("exact"))
    assert torch.allclose(terms.marginal_kl, model.posterior(x).discrete_part.aggregate().kl_to_prior())
    assert terms.marginal_kl > 0 and "marginal_kl" not in terms.values()
    cfg = Config(latent="categorical:3+gaussian:1", balance=4.0)
    assert torch.allclose(objective(terms, cfg, 0), terms.loss + 4.0 * terms.marginal_kl)
    model.zero_grad()
    terms.marginal_kl.backward()  # a function of q(y|x) alone: the encoder's gradient, not the decoder's
    assert model.encoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())
    assert tiny_model("gaussian", 2)(x, make_estimator("reparam")).marginal_kl is None


def impulse_centres(x: torch.Tensor) -> torch.Tensor:
    """Centre of mass (column, row) of each image ``[B, 1, H, W]``, in pixels from the image's centre."""
    _, _, h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h, dtype=x.dtype) - (h - 1) / 2,
                                torch.arange(w, dtype=x.dtype) - (w - 1) / 2, indexing="ij")
    mass = x.sum((-2, -1))
    return torch.stack([(x * cols).sum((-2, -1)) / mass, (x * rows).sum((-2, -1)) / mass], -1).squeeze(1)


def test_random_affine_rotates_and_shifts_within_its_ranges():
    x = torch.rand(6, 1, 28, 28)
    assert torch.allclose(random_affine(x), x, atol=1e-5)  # zero ranges (the defaults): the identity
    dot = torch.zeros(400, 1, 28, 28)
    dot[:, :, 9:11, 17:19] = 1.0  # a 2x2 blob centred 4 px right of and 4 px above the centre
    before = impulse_centres(dot)
    moved = impulse_centres(random_affine(dot, shift=2.0, generator=torch.Generator().manual_seed(0))) - before
    assert moved.abs().max() <= 2.0 + 1e-4 and moved.abs().max() > 1.8  # up to 2 px in each direction
    assert (moved > 0.5).any(0).all() and (moved < -0.5).any(0).all()
    turned = impulse_centres(random_affine(dot, rotation=30.0, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(turned.norm(dim=-1), before.norm(dim=-1), atol=0.05)  # a rotation about the centre
    angle = torch.rad2deg(torch.atan2(turned[:, 1], turned[:, 0]) - torch.atan2(before[:, 1], before[:, 0]))
    assert angle.abs().max() <= 30.5 and angle.abs().max() > 25 and (angle > 10).any() and (angle < -10).any()
    slanted = impulse_centres(random_affine(dot, shear=0.4, generator=torch.Generator().manual_seed(2))) - before
    assert torch.all(slanted[:, 1].abs() < 1e-3)  # a shear moves the blob sideways only, by up to 0.4 x 4 px
    assert slanted[:, 0].abs().max() <= 1.6 + 1e-3 and slanted[:, 0].max() > 1.4 and slanted[:, 0].min() < -1.4
    mirrored = random_affine(x, flip=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)  # a mirror and nothing else, for every image
    halves = impulse_centres(random_affine(dot, flip=0.5,
                                           generator=torch.Generator().manual_seed(4)))[:, 0] / before[:, 0]
    assert torch.allclose(halves.abs(), torch.ones(400), atol=1e-3) and 150 < (halves < 0).sum() < 250
    # flip 0 draws nothing more: the stream, and so the transformations, are those of before the flip existed
    assert torch.equal(random_affine(x, **{**AUGMENT, "flip": 0.0}, generator=torch.Generator().manual_seed(5)),
                       random_affine(x, rotation=15.0, shift=2.0, scale=0.1, shear=0.4,
                                     generator=torch.Generator().manual_seed(5)))
    same = [random_affine(x, **AUGMENT, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*same) and not torch.allclose(same[0], x)
    with pytest.raises(InputError, match=r"need images \[B, C, H, W\]"):
        random_affine(torch.rand(6, 784), **AUGMENT)


def test_the_term_its_gradient_and_the_objective():
    model, x = tiny_model("categorical:3+gaussian:1"), tiny_data(n=5)
    exact = make_estimator("exact")
    assert model(x, exact).consistency is None and "consistency" not in model(x, exact).values()
    assert model(x, exact, x).consistency.abs() < 1e-12  # the same view: no disagreement
    view = tiny_data(n=5, seed=2)
    terms = model(x, exact, view)
    target, theirs = model.posterior(x).discrete_part, model.posterior(view).discrete_part
    assert torch.allclose(terms.consistency, target.kl(theirs).mean())
    assert terms.consistency > 0 and terms.values()["consistency"] == terms.consistency
    # the gradient flows through the view's q alone: that of KL(sg(q(y|x)) || q(y|t(x)))
    model.zero_grad()
    terms.consistency.backward()
    got = model.encoder.weight.grad.clone()
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())
    model.zero_grad()
    fixed = Categorical(target.logits.detach())
    fixed.kl(model.posterior(view).discrete_part).mean().backward()
    assert torch.allclose(got, model.encoder.weight.grad)
    cfg = Config(latent="categorical:3+gaussian:1", consistency=2.5)
    assert torch.allclose(objective(terms, cfg, 0), terms.loss + 2.5 * terms.consistency)
    # without a discrete block a view serves the Gaussian contrastive term alone: no consistency term
    gaussian = tiny_model("gaussian", 2)(x, make_estimator("reparam"), view)
    assert gaussian.consistency is None and gaussian.view is not None


def test_the_settings_are_checked():
    for settings, match in (({"consistency": -1.0}, "consistency must be a finite number >= 0"),
                            ({"consistency": math.inf}, "consistency must be a finite number >= 0"),
                            ({"consistency": 1.0, "latent": "gaussian"}, "needs a latent with a discrete block"),
                            ({"balance": -0.5}, "balance must be a finite number >= 0"),
                            ({"balance": 1.0, "latent": "gaussian"}, "balance needs a latent with a discrete block"),
                            ({"augment": {"rotation": 10.0, "skew": 2.0}}, "augment takes .* not skew"),
                            ({"augment": {**AUGMENT, "shift": -1.0}}, "shift must be a finite number >= 0, got -1.0"),
                            ({"augment": {**AUGMENT, "scale": 1.0}}, "scale must be below 1"),
                            ({"augment": {**AUGMENT, "flip": 1.5}}, "flip must be a probability, at most 1")):
        with pytest.raises(InputError, match=match):
            Config(**settings).check()
    Config(latent="bernoulli:8+gaussian:2", consistency=1.0, augment={"rotation": 10.0}).check()  # the rest 0


def read_metrics(run):
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_a_run_with_consistency_logs_the_term_and_resumes_exactly(tmp_path):
    digits = load_dataset("digits")
    data = Dataset("digits", digits.x_train[:384], digits.y_train[:384], digits.x_test[:64], digits.y_test[:64])
    base = dict(dataset="digits", latent="categorical:10+gaussian:2", prior="mixture", estimator="reparam",
                batch_size=64, binarize="dynamic", consistency=3.0, grad_var_every=0, seed=2)
    full = train(Config(**base, epochs=2, out=str(tmp_path / "full")), progress=False, data=data)
    train(Config(**base, epochs=1, out=str(tmp_path / "cut")), progress=False, data=data)
    resumed = train(Config(**base, epochs=2, out=str(tmp_path / "cut")), resume=True, progress=False, data=data)
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    rows = read_metrics(tmp_path / "full")
    assert [{**r, "time": 0} for r in rows] == [{**r, "time": 0} for r in read_metrics(tmp_path / "cut")]
    assert all(0 < float(r["train_consistency"]) < math.log(10) for r in rows)
    assert "test_consistency" not in rows[0]


def test_consistency_on_data_that_are_not_images_is_a_one_line_error(tmp_path, capsys):
    import numpy as np
    np.save(tmp_path / "flat.npy", np.random.default_rng(0).random((64, 20), dtype=np.float32))
    code, _, err = run_cli(capsys, "train", "--dataset", str(tmp_path / "flat.npy"), "--latent", "bernoulli",
                           "--latent-dim", "4", "--consistency", "1", "--epochs", "1", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "random transformations need images [B, C, H, W]")
    assert not (tmp_path / "r").exists()
