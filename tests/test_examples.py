"""Every script of examples/ runs, with ``DISCVAE_EXAMPLES_TINY=1`` (a few epochs or steps instead of a real
run's), in this process (``runpy``) from a scratch directory, its output checked for what the script promises."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECT = {"quickstart": "codes of the first 3 test digits", "hash_vectors": "query 4: nearest",
          "clustering": "kmeans_pixels_k10", "custom_estimator": "step 19:", "callback": "best test -ELBO",
          "learned_estimator": "the baseline at eta = 0"}


def test_every_example_is_tested_and_shown_in_the_docs():
    assert {p.stem for p in EXAMPLES.glob("*.py")} == set(EXPECT)
    page = (EXAMPLES.parent / "docs" / "examples.md").read_text()
    assert all(f'--8<-- "examples/{name}.py"' in page for name in EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example_runs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCVAE_EXAMPLES_TINY", "1")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py")])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    assert EXPECT[name] in capsys.readouterr().out
