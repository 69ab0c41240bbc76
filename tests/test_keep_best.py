"""Label-free model selection: ``discvae.criteria`` and ``train --keep-best CRITERION``."""
import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from discvae import Config, InputError, load_run
from discvae.augmentation import random_affine
from discvae.criteria import CRITERIA, Invariance, Neighbours, average_precision, code_distances, probe_rows
from discvae.runs import load_checkpoint
from helpers import assert_one_line_error, run_cli


class Coder:
    """A stand-in model whose code of an image is a function of the image."""

    def __init__(self, fn):
        self.codes = fn


def pixels_above(first, last):
    return Coder(lambda images: (images.flatten(1)[:, first:last] > 0.5).to(torch.uint8))


IMAGES = torch.rand(300, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_average_precision_equals_sklearn_with_ties_as_one_threshold():
    generator = torch.Generator().manual_seed(1)
    distances = torch.randint(0, 9, (40, 500), generator=generator)
    relevant = torch.rand(40, 500, generator=generator) < torch.linspace(0.02, 0.6, 40)[:, None]
    relevant[0, :] = False
    relevant[0, 7] = True  # one relevant item; the other rows hold from ~10 to ~300
    expected = [average_precision_score(r.numpy(), -d.numpy()) for r, d in zip(relevant, distances, strict=True)]
    assert np.allclose(average_precision(distances, relevant).numpy(), expected, atol=1e-12)
    codes = torch.randint(0, 3, (30, 5), generator=generator)
    assert torch.equal(code_distances(codes, codes[:7]), (codes[:, None] != codes[:7][None]).sum(-1))


def test_invariance_against_a_direct_computation():
    augment = {"shift": 1.0, "rotation": 10.0}
    coder = pixels_above(10, 20)
    got = Invariance(IMAGES, augment, "none", seed=3)(coder)
    generator = torch.Generator().manual_seed(3)
    x = IMAGES[probe_rows(len(IMAGES), 3)]
    c, v = coder.codes(x).double(), coder.codes(random_affine(x, **augment, generator=generator)).double()
    near, far = (c - v).abs().sum(1).mean(), (c - c.roll(1, 0)).abs().sum(1).mean()
    assert got == pytest.approx(float(1 - near / far), abs=1e-12)
    # the bounds: a view that keeps every code scores 1, codes that ignore the image score 0
    assert Invariance(IMAGES, {}, "none")(coder) == 1.0
    assert Invariance(IMAGES, augment, "none")(Coder(lambda x: torch.zeros(len(x), 8, dtype=torch.uint8))) == 0


def test_neighbours_against_a_direct_computation():
    coder = pixels_above(0, 12)
    got = Neighbours(IMAGES, {}, "none", seed=2)(coder)
    rows, flat = probe_rows(len(IMAGES), 2), IMAGES.flatten(1).numpy()
    codes = coder.codes(IMAGES).numpy()
    k = round(0.1 * (len(IMAGES) - 1))
    aps = []
    for i in rows.tolist():
        others = np.delete(np.arange(len(IMAGES)), i)
        pixel = np.linalg.norm(flat[others] - flat[i], axis=1)
        relevant = np.isin(others, others[np.argsort(pixel)[:k]])
        aps.append(average_precision_score(relevant, -(codes[others] != codes[i]).sum(1)))
    assert got == pytest.approx(np.mean(aps), abs=1e-9)
    # the pixels themselves as the code (no detail lost) rank better than a code of 3 pixels
    assert Neighbours(IMAGES, {}, "none")(pixels_above(0, 36)) > Neighbours(IMAGES, {}, "none")(pixels_above(0, 3))


def test_criteria_leave_the_random_stream_alone():
    state = torch.get_rng_state()
    for make in CRITERIA.values():
        make(IMAGES, {"shift": 1.0}, "dynamic", 4)(pixels_above(0, 8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(probe_rows(100, 4, 10), probe_rows(100, 4, 10))
    assert not torch.equal(probe_rows(100, 4, 10), probe_rows(100, 5, 10))


def test_keep_best_keeps_the_best_epoch_as_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--dataset", "digits", "--latent-dim", "8", "--epochs", "4",
                         "--batch-size", "128", "--grad-var-every", "0", "--keep-best", "neighbours",
                         "--out", run, "--quiet")
    assert code == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    scores = [float(r["keep_best_neighbours"]) for r in rows]
    best = max(range(len(scores)), key=scores.__getitem__) + 1
    ckpt = load_checkpoint(run / "best")
    assert ckpt["epoch"] == best and len(ckpt["history"]) == best
    assert json.loads((run / "best" / "config.json").read_text())["out"] == str(run / "best")
    # the kept epoch is a run as any other: its score recomputed from its weights is the score it was kept by
    cfg, model, data = load_run(run / "best")
    score = CRITERIA["neighbours"](data.x_train, cfg.augment, cfg.binarize, cfg.seed)(model)
    assert score == pytest.approx(scores[best - 1], abs=1e-12)
    code, _, _ = run_cli(capsys, "evaluate", run / "best", "--k", "2")
    assert code == 0
    # resumed, the run goes on comparing against the best of its history
    code, _, _ = run_cli(capsys, "train", "--resume", "--out", run, "--epochs", "5", "--quiet")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    scores.append(float(rows[-1]["keep_best_neighbours"]))
    assert code == 0 and load_checkpoint(run / "best")["epoch"] == max(range(5), key=scores.__getitem__) + 1


def test_keep_best_needs_a_known_criterion_and_a_discrete_code(capsys, tmp_path):
    with pytest.raises(InputError, match="scores discrete codes"):
        Config(latent="gaussian", estimator="reparam", keep_best="neighbours").check()
    with pytest.raises(InputError, match="unknown keep_best criterion"):
        Config(keep_best="accuracy").check()
    try:
        code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--keep-best", "labels", "--out", tmp_path)
    except SystemExit as exit_:  # argparse
        code, err = exit_.code, capsys.readouterr().err
    assert_one_line_error(code, err, "invalid choice: 'labels'")
