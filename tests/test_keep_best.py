"""Label-free model selection: ``discvae.criteria`` and ``train --keep-best CRITERION``."""
import csv
import json

import pytest
import torch

from discvae import Config, InputError, load_run
from discvae.criteria import CRITERIA, invariance, probe_images
from discvae.runs import load_checkpoint
from helpers import assert_one_line_error, run_cli, tiny_model


class Coder(torch.nn.Module):
    """A stand-in model whose code of an image is given by a function of the image."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def codes(self, x):
        return self.fn(x)


def test_invariance_against_a_direct_computation():
    x = torch.rand(50, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    augment = {"shift": 1.0, "rotation": 10.0}
    model = tiny_model("bernoulli", 5, x_dim=36)
    coder = Coder(lambda images: model.codes(images.flatten(1)))
    got = invariance(coder, x, augment, "none", seed=3)
    generator = torch.Generator().manual_seed(3)
    from discvae.augmentation import random_affine
    views = random_affine(x, **augment, generator=generator)
    c, v = coder.codes(x).double(), coder.codes(views).double()
    near = (c - v).abs().sum(1).mean()
    far = (c - c.roll(1, 0)).abs().sum(1).mean()
    assert got == pytest.approx(float(1 - near / far), abs=1e-12)
    # the bounds: a view that keeps every code scores 1, codes that ignore the image score 0
    assert invariance(Coder(lambda images: (images.flatten(1)[:, :8] > 0.5).to(torch.uint8)), x, {}, "none") == 1.0
    assert invariance(Coder(lambda images: torch.zeros(len(images), 8, dtype=torch.uint8)), x, augment, "none") == 0
    # a code that follows one pixel's detail is changed by a shift: far from invariant
    assert invariance(Coder(lambda images: (images.flatten(1)[:, 14:16] > 0.5).to(torch.uint8)), x,
                      {"shift": 2.0}, "none") < 0.5


def test_probe_images_leave_the_random_stream_alone():
    x = torch.arange(100.0)[:, None]
    state = torch.get_rng_state()
    a, b = probe_images(x, 4, 10), probe_images(x, 4, 10)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(a, b) and len(a.unique()) == 10
    assert not torch.equal(a, probe_images(x, 5, 10))


def test_keep_best_keeps_the_best_epoch_as_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--dataset", "digits", "--latent-dim", "8", "--epochs", "4",
                         "--batch-size", "128", "--grad-var-every", "0", "--keep-best", "invariance",
                         "--out", run, "--quiet")
    assert code == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    scores = [float(r["keep_best_invariance"]) for r in rows]
    best = max(range(len(scores)), key=scores.__getitem__) + 1
    ckpt = load_checkpoint(run / "best")
    assert ckpt["epoch"] == best and len(ckpt["history"]) == best
    assert json.loads((run / "best" / "config.json").read_text())["out"] == str(run / "best")
    # the kept epoch is a run as any other: its score recomputed from its weights is the score it was kept by
    cfg, model, data = load_run(run / "best")
    x = probe_images(data.x_train, cfg.seed)
    assert CRITERIA["invariance"](model, x, cfg.augment, cfg.binarize, cfg.seed) == pytest.approx(scores[best - 1])
    code, _, _ = run_cli(capsys, "evaluate", run / "best", "--k", "2")
    assert code == 0
    # resumed, the run continues to compare against the best of its history
    code, _, _ = run_cli(capsys, "train", "--resume", "--out", run, "--epochs", "5", "--quiet")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    scores.append(float(rows[-1]["keep_best_invariance"]))
    assert code == 0 and load_checkpoint(run / "best")["epoch"] == max(range(5), key=scores.__getitem__) + 1


def test_keep_best_needs_a_known_criterion_and_a_discrete_code(capsys, tmp_path):
    with pytest.raises(InputError, match="scores discrete codes"):
        Config(latent="gaussian", estimator="reparam", keep_best="invariance").check()
    with pytest.raises(InputError, match="unknown keep_best criterion"):
        Config(keep_best="accuracy").check()
    try:
        code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--keep-best", "labels", "--out", tmp_path)
    except SystemExit as exit_:  # argparse
        code, err = exit_.code, capsys.readouterr().err
    assert_one_line_error(code, err, "invalid choice: 'labels'")
