"""``discvae reproduce --epochs 1`` on the embedded digits: every run, eval.json, figure and the report."""
import json
import re

import matplotlib.image as mpimg

from discvae.cli import main
from discvae.experiments.reproduce import GRID


def test_reproduce_digits(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "--out", str(out), "--dataset", "digits", "--epochs", "1", "--k", "5",
                 "--grad-var-every", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "report.md"))
    report = (out / "report.md").read_text()
    for name in GRID:
        result = json.loads((out / name / "eval.json").read_text())
        assert result["epoch"] == 1 and result["k"] == 5
        config = json.loads((out / name / "config.json").read_text())  # He for the CNNs, which collapse without it
        assert config["init"] == ("he" if config["arch"] == "cnn" else "torch")
        assert re.search(rf"^\| {name} \| 1 \|", report, re.M)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    kinds = ("reconstructions", "samples", "units")
    expected = {f"figures/{group}/convergence.png" for group in ("mnist", "fashion")} | {
        f"figures/{GRID[name][0]}/{name}-{kind}.png" for name in GRID for kind in kinds} | {
        "figures/mnist/fc_cvae_mnist-templates.png", "figures/mnist/cnn_cvae_mnist-templates.png",
        "figures/mnist/reconstructions.png"}
    assert set(figures) == expected
    for path in figures:
        image = mpimg.imread(out / path)
        assert image.ndim >= 2 and min(image.shape[:2]) > 50 and (out / path).stat().st_size < 200_000
    assert mpimg.imread(out / "figures/mnist/reconstructions.png").shape[0] == (2 * 5 * 9 + 1) * 7  # 2 x (x + 4)

    # a second call resumes the existing runs: nothing retrains, --epochs 2 continues the selected one
    assert main(["reproduce", "--out", str(out), "--dataset", "digits", "--epochs", "2", "--k", "5",
                 "--only", "fc_cvae_mnist", "--quiet"]) == 0
    assert len((out / "fc_cvae_mnist" / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert json.loads((out / "fc_cvae_mnist" / "eval.json").read_text())["epoch"] == 2
    assert "fc_bvae_mnist" not in (out / "report.md").read_text()


def test_reproduce_rejects_bad_input(tmp_path, capsys):
    for argv, match in ((["--only", "fc_bvae_mnist,nope"], "nope"), (["--epochs", "0"], "--epochs")):
        assert main(["reproduce", "--out", str(tmp_path), "--dataset", "digits", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and match in err
