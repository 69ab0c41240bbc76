"""The command line: a digits run end to end, and every error path ends with one line and exit status 2."""
import gzip
import json
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

from discvae.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_and_reconstruct_digits(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--dataset", "digits", "--latent-dim", "8", "--epochs", "2",
                           "--batch-size", "256", "--out", str(run), "--quiet", "--num-samples", "2",
                           "--baseline", "loo")
    assert code == 0 and out.strip() == str(run)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["estimator_options"] == {"num_samples": 2, "baseline": "loo"} and cfg["epochs"] == 2
    code, out, _ = run_cli(capsys, "reconstruct", str(run), "--n", "5", "--rows", "3")
    png = run / "reconstructions.png"
    assert code == 0 and out.strip() == str(png)
    image = mpimg.imread(png)
    assert image.shape[0] == (6 * 9 + 1) * 7 and image.shape[1] == (5 * 9 + 1) * 7  # 8x8 images, 1 px gaps, x7
    code, _, _ = run_cli(capsys, "train", "--resume", "--out", str(run), "--epochs", "3", "--quiet")
    assert code == 0 and len((run / "metrics.csv").read_text().splitlines()) == 1 + 3


def assert_one_line_error(code, err, match):
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert match in err and "Traceback" not in err


@pytest.mark.parametrize("argv,match", [
    (["train", "--dataset", "cifar"], "unknown dataset"),
    (["train", "--dataset", "digits", "--epochs", "-1"], "--epochs"),
    (["train", "--dataset", "digits", "--latent", "poisson"], "is not one of bernoulli, categorical"),
    (["train", "--dataset", "digits", "--init", "xavier"], "invalid choice"),
    (["train", "--dataset", "digits", "--epochs", "two"], "invalid int"),
    (["train", "--dataset", "digits", "--baseline", "loo"], "num-samples"),
    (["train", "--dataset", "digits", "--device", "cuda:0"] if "torch" else [], "CUDA"),
    (["train", "--dataset", "digits", "--arch", "cnn", "--latent", "categorical", "--latent-dim", "1"], "too small"),
    (["train", "--resume"], "--out"),
    (["reconstruct", "/nonexistent/run"], "not a run directory"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments(tmp_path, capsys, argv, match):
    import torch

    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present")
    argv = [a if a != "OUT" else str(tmp_path) for a in argv]
    try:
        code = main(argv + ["--out", str(tmp_path / "run")] if argv[0] == "train" and "--resume" not in argv
                    else argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    assert_one_line_error(code, capsys.readouterr().err, match)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_missing_and_corrupt_data_files(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out",
                           str(tmp_path / "run"))
    assert_one_line_error(code, err, "train-images-idx3-ubyte.gz")
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00\x00\x02"))  # header cut short
    code, _, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out",
                           str(tmp_path / "run"))
    assert_one_line_error(code, err, "idx")
    assert not (tmp_path / "run").exists()


def test_incompatible_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--dataset", "digits", "--latent-dim", "8", "--epochs", "1", "--out", str(run),
                   "--quiet")[0] == 0
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "latent_dim": 12}))
    code, _, err = run_cli(capsys, "reconstruct", str(run))
    assert_one_line_error(code, err, "disagree on latent_dim")
    (run / "checkpoint.pt").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "reconstruct", str(run))
    assert_one_line_error(code, err, "cannot read checkpoint")
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--out", str(run))
    assert_one_line_error(code, err, "already holds a run")


def test_entry_point_exit_status_and_help():
    proc = subprocess.run([sys.executable, "-m", "discvae.cli", "train", "--dataset", "nope"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    for cmd in ("train", "reconstruct"):
        proc = subprocess.run([sys.executable, "-m", "discvae.cli", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: discvae " + cmd in proc.stdout
