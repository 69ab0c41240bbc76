"""``discvae compare`` on the embedded digits, ``discvae train`` with every estimator, and the option schedule."""
import dataclasses
import itertools
import json
import math

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn.functional as F

from discvae import Config, Dataset, load_dataset, make_estimator
from discvae.cli import main
from discvae.estimators import ESTIMATORS
from discvae.evaluation import fixed_binarization
from discvae.experiments.compare import Comparison, Spec, bias_variance, compare, parse_spec
from discvae.runs import read_csv
from discvae.training import estimator_options, load_run
from helpers import tiny_data, tiny_model

SPECS = ["importance:num_samples=1", "rloo", "disarm", "vimco", "gumbel:tau=0.5", "st-gumbel", "straight-through",
         "exact"]


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    return Dataset(d.name, d.x_train[:512], d.y_train[:512], d.x_test[:128], d.y_test[:128])


def test_compare_on_digits_writes_its_report(tmp_path, digits):
    base = Config(dataset="digits", latent_dim=6, epochs=2, batch_size=128, binarize="dynamic", grad_var_every=1,
                  grad_var_repeats=3)
    specs = [parse_spec(s, 2) for s in SPECS]
    comparison = Comparison(out=tmp_path, eval_every=1, iwae_k=5, iwae_n=64, final_k=10, final_n=128, bias_batch=16,
                          bias_repeats=30)
    results = compare(base, specs, comparison, data=digits)
    report = (tmp_path / "report.md").read_text()
    for s in SPECS:
        assert f"| {s} |" in report
    for png in ("bias_variance.png", "curves.png"):
        assert mpimg.imread(tmp_path / png).shape[0] > 100
    rows = {r["label"]: r for r in results["bias_variance"]}
    assert rows["exact"]["encoder_bias"] < 1e-10 and rows["exact"]["encoder_var"] == 0
    assert rows["exact"]["evals_per_point"] == 2**6 / 16 and rows["disarm"]["evals_per_point"] == 2
    final = {r["label"]: r for r in results["final"]}
    assert all(r["epochs"] == 2 and r["steps"] == 8 and math.isfinite(r["test_neg_iwae"]) for r in final.values())
    # the training ELBO (the RODEO / DisARM tables' measure): a single-sample estimate over every training image,
    # within 5 standard errors of the exact mean -ELBO enumerated over the 2^6 states (no library code but the
    # networks), the standard error from the exact per-image variances of ln p(x, z) - ln q(z|x) under q
    _, model, _ = load_run(tmp_path / "runs" / "rloo")
    x = fixed_binarization(digits.x_train, "dynamic", base.seed)
    with torch.no_grad():
        eta = model.encoder(x)
        states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=6)))
        log_q = (states[:, None] * F.logsigmoid(eta) + (1 - states[:, None]) * F.logsigmoid(-eta)).sum(-1)
        weight = model.log_likelihood(x, states[:, None].expand(-1, len(x), -1)) - 6 * math.log(2.0) - log_q
        mean = (log_q.exp() * weight).sum(0)
        var = (log_q.exp() * (weight - mean) ** 2).sum(0)
    se = (var.mean() / len(x)).sqrt().item()
    assert abs(final["rloo"]["train_neg_elbo"] + mean.mean().item()) < 5 * se, (final["rloo"], -mean.mean(), se)
    assert f"| rloo | 2 | 8 | {final['rloo']['train_neg_elbo']:.2f} | {final['rloo']['test_neg_elbo']:.2f} |" in report
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert settings["epochs"] == 2 and settings["init"] == "torch" and "- init: `torch`" in report
    assert settings["slope"] is None and "- slope: `None`" in report  # the architecture's own (0.2, nonlinear)
    # restarting resumes: finished runs are reused, not retrained
    metrics = (tmp_path / "runs" / "rloo" / "metrics.csv").read_text()
    compare(base, specs[1:2], comparison, data=digits)
    assert (tmp_path / "runs" / "rloo" / "metrics.csv").read_text() == metrics
    # and a longer comparison continues them, keeping the bounds already measured as they were written
    bounds = (tmp_path / "runs" / "rloo" / "iwae.csv").read_text()
    compare(dataclasses.replace(base, epochs=3), specs[1:2], comparison, data=digits)
    longer = (tmp_path / "runs" / "rloo" / "iwae.csv").read_text()
    assert longer.startswith(bounds) and [row.split(",")[0] for row in longer.splitlines()] == ["epoch", "1", "2", "3"]


def test_compare_with_zero_epochs_measures_bias_and_variance_only(tmp_path, digits):
    base = Config(dataset="digits", latent="categorical", latent_dim=5, groups=2, epochs=0, batch_size=128)
    comparison = Comparison(out=tmp_path, bias_epochs=0, bias_batch=8, bias_repeats=5)
    results = compare(base, [parse_spec("rloo", 2), parse_spec("exact", 2)], comparison, data=digits)
    assert results["final"] == [] and not (tmp_path / "runs").exists() and not (tmp_path / "curves.png").exists()
    assert "## Training" not in (tmp_path / "report.md").read_text()
    assert results["bias_variance"][1]["evals_per_point"] == 25 / 8  # 5^2 states decoded once per batch of 8


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_cli(tmp_path, capsys):
    code, out, err = run_cli(capsys, "compare", "rloo", "exact", "--latent-dim", "4", "--epochs", "1",
                             "--batch-size", "512", "--iwae-k", "3", "--iwae-n", "20", "--final-k", "3", "--final-n",
                             "20", "--bias-batch", "8", "--bias-repeats", "4", "--out", tmp_path / "c", "--quiet")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "c" / "report.md")
    code, _, err = run_cli(capsys, "compare", "rloo:num_samples", "--out", tmp_path / "d")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "key=value" in err
    code, _, err = run_cli(capsys, "compare", "reinforce", "--out", tmp_path / "d")
    assert code == 2 and "unknown estimator" in err


@pytest.mark.parametrize("estimator", [e for e in ESTIMATORS if e != "reparam"])
def test_train_runs_with_every_estimator(tmp_path, capsys, estimator):
    code, out, err = run_cli(capsys, "train", "--dataset", "digits", "--latent-dim", "6", "--epochs", "1",
                             "--batch-size", "512", "--num-samples", "2", "--estimator", estimator,
                             "--grad-var-repeats", "2", "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 2


@pytest.mark.parametrize("argv,match", [
    (["--latent", "categorical", "--estimator", "disarm", "--num-samples", "2"], "disarm needs a bernoulli latent"),
    (["--latent-dim", "50", "--estimator", "exact"], "limit is 4096"),
    (["--estimator", "vimco"], "vimco needs --num-samples of at least 2"),
    (["--estimator", "gumbel", "--tau", "-1"], "tau must be a positive"),
    (["--estimator", "gumbel", "--tau-anneal", "1", "0.5", "-2"], "schedule of tau"),
])
def test_bad_estimator_combinations_fail_before_training(tmp_path, capsys, argv, match):
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--out", tmp_path / "run", "--quiet", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_tau_anneal_is_a_plain_data_schedule_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--latent", "categorical", "--latent-dim", "4",
                           "--estimator", "st-gumbel", "--tau-anneal", "1.0", "0.5", "0.1", "--epochs", "1",
                           "--batch-size", "512", "--out", run, "--quiet")
    assert code == 0, err
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.estimator_schedule == {"tau": [1.0, 0.5, 0.1]}
    assert estimator_options(cfg, 0)["tau"] == 1.0
    assert estimator_options(cfg, 3)["tau"] == pytest.approx(math.exp(-0.3))
    assert estimator_options(cfg, 100)["tau"] == 0.5
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--resume", "--out", run, "--epochs", "3", "--tau-anneal", "1", "0.1",
                           "0.1", "--quiet")
    assert code == 2 and "cannot change --tau-anneal" in err


def test_compare_over_seeds_reports_mean_and_std(tmp_path, capsys):
    out = tmp_path / "c"
    code, _, err = run_cli(capsys, "compare", "rloo", "exact", "--seeds", "0", "1", "--latent-dim", "4", "--epochs",
                           "1", "--batch-size", "512", "--iwae-k", "3", "--iwae-n", "20", "--final-k", "3",
                           "--final-n", "20", "--bias-batch", "8", "--bias-repeats", "4", "--grad-var-repeats", "2",
                           "--out", out, "--quiet")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert results["seeds"] == [0, 1] and [r["settings"]["seed"] for r in per_seed] == [0, 1]
    for table, key in (("final", "train_neg_elbo"), ("final", "test_neg_elbo"), ("final", "test_neg_iwae"),
                       ("bias_variance", "encoder_var")):
        for i, row in enumerate(results[table]):
            values = [r[table][i][key] for r in per_seed]
            assert row[key] == pytest.approx(sum(values) / 2)
            assert row[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    rloo = results["final"][0]
    assert rloo["label"] == "rloo" and rloo["test_neg_elbo_std"] > 0  # the seeds made different runs
    report = (out / "report.md").read_text()
    assert (f"| rloo | 1 | {rloo['steps']} | {rloo['train_neg_elbo']:.2f} ± {rloo['train_neg_elbo_std']:.2f} | "
            f"{rloo['test_neg_elbo']:.2f} ± {rloo['test_neg_elbo_std']:.2f} | ") in report
    assert "(seed-0/curves.png)" in report and (out / "seed-1" / "curves.png").exists()
    code, _, err = run_cli(capsys, "compare", "rloo", "--seed", "1", "--seeds", "0", "1", "--out", tmp_path / "d")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--seed or --seeds" in err
    code, _, err = run_cli(capsys, "compare", "rloo", "--seeds", "1", "1", "--out", tmp_path / "d")
    assert code == 2 and "--seeds must differ" in err


def scaled_exact(q, f, num_samples: int = 1):
    """exact with its whole gradient multiplied by 1.1 (its value unchanged): a 10 % bias without noise."""
    surrogate = ESTIMATORS["exact"](q, f)
    return surrogate + 0.1 * (surrogate - surrogate.detach())


def enumerated_terms(model, x):
    """The batch means of KL(q || p) and E_q[ln p(x|z)] by sums over the 2^c bit vectors written out here: q(z|x)
    from sigmoid(eta), the uniform prior 2^-c (no library code but the encoder, decoder and likelihood)."""
    eta = model.encoder(x)
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=eta.shape[1])), dtype=x.dtype)  # [S, c]
    p = torch.sigmoid(eta)[None]  # [1, B, c]
    log_q = (states[:, None] * torch.log(p) + (1 - states[:, None]) * torch.log1p(-p)).sum(-1)  # [S, B]
    q = log_q.exp()
    kl = (q * (log_q + eta.shape[1] * math.log(2.0))).sum(0).mean()
    return kl, (q * model.log_likelihood(x, states[:, None].expand(-1, len(x), -1))).sum(0).mean()


def test_compare_reports_bias_against_an_independent_truth():
    """compare's encoder bias column: a x1.1 estimator's is 10 % of the norm of grad E_q[f] (it has no noise),
    gumbel's (tau = 1) is above its floor, rloo's (unbiased) within it; the truth is the gradient of
    ``enumerated_terms``, not compare's own ``exact``."""
    model, x = tiny_model("bernoulli", 3), tiny_data(16)
    kl, expected_ll = enumerated_terms(model, x)
    encoder = list(model.encoder.parameters())
    truth, ll_grad = (torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, encoder, retain_graph=True)]).norm()
                      .item() for v in (kl - expected_ll, expected_ll))
    specs = [parse_spec("rloo", 2), parse_spec("gumbel:tau=1", 2),
             Spec("x1.1", make_estimator(scaled_exact, num_samples=2))]
    torch.manual_seed(13)
    rows = {r["label"]: r for r in bias_variance(model, x, specs, 400)}
    assert all(r["truth_encoder_norm"] == pytest.approx(truth, rel=1e-10) for r in rows.values())
    scaled, gumbel, rloo = rows["x1.1"], rows["gumbel:tau=1"], rows["rloo"]
    assert scaled["encoder_bias"] == pytest.approx(0.1 * ll_grad, rel=1e-9) and scaled["encoder_noise_floor"] < 1e-12
    assert gumbel["encoder_bias"] > 5 * gumbel["encoder_noise_floor"], gumbel
    assert rloo["encoder_bias"] < 2 * rloo["encoder_noise_floor"], rloo


def test_compare_with_stacked_seeds_gives_each_seed_its_solo_results(tmp_path, capsys):
    flags = ["rloo", "--seeds", "0", "1", "--latent-dim", "4", "--epochs", "2", "--eval-every", "1", "--batch-size",
             "256", "--iwae-k", "3", "--iwae-n", "20", "--final-k", "3", "--final-n", "20", "--bias-batch", "8",
             "--bias-repeats", "4", "--grad-var-every", "2", "--grad-var-repeats", "2", "--quiet"]
    results = {}
    for name, more in (("alone", []), ("stacked", ["--stacked"])):
        code, _, err = run_cli(capsys, "compare", *flags, *more, "--out", tmp_path / name)
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    alone, stacked = results["alone"]["final"][0], results["stacked"]["final"][0]
    for key in ("test_neg_elbo", "test_neg_iwae", "encoder_var"):
        assert stacked[key] == pytest.approx(alone[key], rel=1e-5), key
    # the std over the 2 seeds moves by at most sqrt(2) max_i |delta_i| when each seed's -ELBO moves by delta_i
    # (|std(a + d) - std(a)| <= |d| / sqrt(n - 1)): the means' tolerance carried over, not relative to the small std
    assert stacked["test_neg_elbo_std"] == pytest.approx(alone["test_neg_elbo_std"],
                                                         abs=math.sqrt(2) * 1e-5 * alone["test_neg_elbo"])
    for seed in (0, 1):  # the bounds after epochs 1 and 2, each on the seed's own test points
        mine, theirs = (read_csv(tmp_path / name / f"seed-{seed}" / "runs" / "rloo" / "iwae.csv")
                        for name in ("stacked", "alone"))
        assert [r["epoch"] for r in mine] == [r["epoch"] for r in theirs] == [1, 2]
        assert [r["test_iwae"] for r in mine] == pytest.approx([r["test_iwae"] for r in theirs], rel=1e-5)
    assert "- stacked: `True`" in (tmp_path / "stacked" / "seed-1" / "report.md").read_text()
