"""Named recipes and settings files: ``train --preset NAME``, ``--config FILE``, ``--print-config``."""
import json
from pathlib import Path

import pytest

from discvae import Config
from discvae.presets import PRESETS, preset
from discvae.runs import read_settings
from helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_a_valid_configuration(name):
    settings = preset(name)
    assert "out" not in settings and "dataset" not in settings  # a recipe: where and on what is the user's choice
    Config.from_dict(settings, name).check()


def test_the_hashing_preset_of_the_older_docs_is_kept_as_a_settings_file(capsys):
    # docs/APPLICATIONS.md's commands up to session 33 pass it with --config in place of --preset hashing
    path = Path(__file__).resolve().parents[1] / "docs" / "applications" / "hashing-v1.json"
    Config.from_dict(read_settings(path), path.name).check()
    code, out, _ = run_cli(capsys, "train", "--config", path, "--latent-dim", "32", "--print-config")
    old = json.loads(out)
    assert code == 0 and old["latent"] == "bernoulli" and old["latent_dim"] == 32 and old["balance"] == 5
    assert old["keep_best"] == "neighbours" and old["contrastive"] == 0 and preset("hashing")["contrastive"] > 0


def test_print_config_shows_the_preset_with_the_flags_given_over_it(capsys):
    code, out, _ = run_cli(capsys, "train", "--preset", "hashing", "--print-config")
    printed = json.loads(out)
    assert code == 0 and {k: printed[k] for k in preset("hashing")} == preset("hashing")
    assert printed["out"] == "runs/mnist-nonlinear-bernoulli16-gaussian16-disarm-s0" and printed["lr"] == Config().lr
    code, out, _ = run_cli(capsys, "train", "--preset", "hashing", "--latent-dim", "64", "--num-samples", "4",
                           "--flip", "0.5", "--dataset", "fashion-mnist", "--print-config")
    over = json.loads(out)
    assert code == 0 and over["latent_dim"] == 64 and over["dataset"] == "fashion-mnist"
    assert over["out"] == "runs/fashion-mnist-nonlinear-bernoulli64-gaussian16-disarm-s0"  # the bits take the size
    # a flag sets one key of a dict setting; the preset's other keys stay
    assert over["estimator_options"] == {**preset("hashing")["estimator_options"], "num_samples": 4}
    assert over["augment"] == {**printed["augment"], "flip": 0.5}
    assert {k: v for k, v in over.items() if k not in ("latent_dim", "dataset", "estimator_options", "augment",
                                                       "out")} == {k: v for k, v in printed.items() if k not in (
        "latent_dim", "dataset", "estimator_options", "augment", "out")}


def test_a_latent_given_with_its_own_sizes_replaces_the_presets_size(capsys):
    code, out, _ = run_cli(capsys, "train", "--preset", "hashing", "--latent", "bernoulli:16+gaussian:16",
                           "--gaussian-contrastive", "200", "--print-config")
    hybrid = json.loads(out)
    assert code == 0 and hybrid["latent"] == "bernoulli:16+gaussian:16" and hybrid["latent_dim"] is None
    assert hybrid["gaussian_contrastive"] == 200 and hybrid["consistency"] == preset("hashing")["consistency"]
    code, _, err = run_cli(capsys, "train", "--preset", "hashing", "--latent", "bernoulli:16+gaussian:16",
                           "--latent-dim", "8", "--print-config")  # sizes given twice by the user
    assert_one_line_error(code, err, "gives its own sizes")


def test_another_architecture_drops_the_presets_options_of_its_own(capsys):
    assert preset("hashing")["arch"] == "nonlinear" and preset("hashing")["hidden"] == 500
    code, out, _ = run_cli(capsys, "train", "--preset", "hashing", "--arch", "cnn", "--print-config")
    cnn = json.loads(out)
    assert code == 0 and cnn["arch"] == "cnn" and cnn["hidden"] is None and cnn["slope"] is None
    assert cnn["contrastive"] == preset("hashing")["contrastive"] and cnn["out"].startswith("runs/mnist-cnn-")
    code, out, _ = run_cli(capsys, "train", "--preset", "hashing", "--arch", "fc", "--hidden", "64", "--print-config")
    assert code == 0 and json.loads(out)["hidden"] == 64  # the user's own width stays
    code, out, _ = run_cli(capsys, "train", "--preset", "hashing", "--arch", "nonlinear", "--print-config")
    assert code == 0 and json.loads(out)["hidden"] == 500  # the same architecture keeps its options
    code, _, err = run_cli(capsys, "train", "--preset", "hashing", "--arch", "cnn", "--hidden", "64",
                           "--print-config")
    assert_one_line_error(code, err, "the cnn architecture has no --hidden width")


def test_a_printed_configuration_passed_back_trains_the_same_run(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "--preset", "hashing", "--dataset", "digits", "--epochs", "1",
                           "--hidden", "16", "--batch-size", "512", "--out", tmp_path / "a", "--print-config")
    assert code == 0 and not (tmp_path / "a").exists()  # printing trains nothing, writes nothing
    (tmp_path / "hashing.json").write_text(out)
    code, _, _ = run_cli(capsys, "train", "--config", tmp_path / "hashing.json", "--quiet")
    assert code == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(out)
    code, again, _ = run_cli(capsys, "train", "--config", tmp_path / "a" / "config.json", "--print-config")
    assert code == 0 and json.loads(again) == json.loads(out)  # a run's config.json is a settings file
    (tmp_path / "partial.json").write_text('{"latent_dim": 12, "estimator_options": {"baseline": "loo"}}')
    code, partial, _ = run_cli(capsys, "train", "--config", tmp_path / "partial.json", "--num-samples", "3",
                               "--print-config")
    partial = json.loads(partial)  # left out: the defaults, and the run's name made as without a file
    assert code == 0 and partial["out"] == "runs/mnist-fc-bernoulli12-importance-s0"
    assert partial["estimator_options"] == {"num_samples": 3, "baseline": "loo"} and partial["epochs"] == 300
    (tmp_path / "width.json").write_text('{"hidden": 64}')  # a width for the default architecture, fc
    code, out, _ = run_cli(capsys, "train", "--config", tmp_path / "width.json", "--arch", "fc", "--print-config")
    assert code == 0 and json.loads(out)["hidden"] == 64


@pytest.mark.parametrize("argv, match", [
    (["--preset", "hashing", "--config", "x.json"], "not allowed with argument --preset"),
    (["--preset", "fast"], "invalid choice: 'fast'"),
    (["--config", "{missing}"], "cannot read"),
    (["--config", "{unknown}"], "unknown settings latnt"),
    (["--config", "{bad_type}"], "epochs"),
    (["--config", "{list}"], "must hold a JSON object"),
    (["--resume", "--out", "{run}", "--preset", "hashing"], "drop --preset and --config"),
])
def test_bad_presets_and_settings_files_get_one_line(tmp_path, capsys, argv, match):
    files = {"missing": tmp_path / "nope.json", "unknown": tmp_path / "u.json", "bad_type": tmp_path / "t.json",
             "list": tmp_path / "l.json", "run": tmp_path / "run"}
    files["unknown"].write_text('{"latnt": 3}')
    files["bad_type"].write_text('{"epochs": "many"}')
    files["list"].write_text("[1, 2]")
    try:
        code, _, err = run_cli(capsys, "train", *[a.format(**files) for a in argv], "--print-config")
    except SystemExit as exit_:  # argparse
        code, err = exit_.code, capsys.readouterr().err
    assert_one_line_error(code, err, match)
