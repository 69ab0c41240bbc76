"""Every snippet of the README runs: its fenced bash and Python blocks, in order, in one scratch directory (later
blocks use the runs of earlier ones), with these substitutions so that the whole README takes seconds:

* ``--dataset mnist --data-dir DATA`` (or ``--data-dir DATA`` alone) -> ``--dataset digits`` (the embedded 8x8
  digits; the commands are otherwise the same); the collections ``mnist:SPLIT`` of ``index --data`` and ``search
  --query`` -> ``digits:SPLIT``;
* ``discvae train``: ``--epochs N`` -> ``--epochs 1`` (``--epochs 2`` with ``--resume``, which must continue), and
  a new run without ``--epochs`` gets ``--epochs 1``; a new run without ``--batch-size`` gets ``--batch-size 256``;
  every train gets ``--grad-var-every 0 --quiet``;
* ``discvae reproduce --out runs/repro --data-dir DATA`` (the whole grid on MNIST) -> the same on the digits with
  ``--only fc_bvae_mnist`` (the README's next line runs the whole grid on the digits);
* ``discvae evaluate``: ``--k 1000`` -> ``--k 10``; ``discvae reproduce`` without ``--epochs``: ``--epochs 1 --k 10``;
* Python: ``epochs=20`` -> ``epochs=1``.

Skipped, and said so: lines starting with ``pip install`` (installing), and the test command itself (``pytest``).
``discvae ...`` runs in this process (``discvae.cli.main``); ``torchrun`` as ``python -m torch.distributed.run`` in a
subprocess with the line's environment variables. Each command must exit with status 0.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from discvae.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, re.M | re.S)
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped, ``&&`` split."""
    text = block.replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines()]
    return [part.strip() for line in lines if line and not line.startswith("#") for part in line.split("&&")]


def substituted(argv: list[str]) -> list[str]:
    """The README's discvae arguments with the substitutions of the module docstring."""
    text = " ".join(argv).replace("--dataset mnist --data-dir DATA", "--dataset digits")
    text = text.replace("reproduce --out runs/repro --data-dir DATA", "reproduce --out runs/repro --dataset digits "
                        "--only fc_bvae_mnist")
    text = re.sub(r"(--data|--query) mnist:(\w+)( --data-dir DATA)?", r"\1 digits:\2", text)
    text = text.replace("--data-dir DATA", "--dataset digits")
    argv = text.split()
    command = argv[0]
    if command == "train":
        resume = "--resume" in argv
        if "--epochs" in argv:
            argv[argv.index("--epochs") + 1] = "2" if resume else "1"
        elif not resume:
            argv += ["--epochs", "1"]
        if not resume and "--batch-size" not in argv:
            argv += ["--batch-size", "256"]
        argv += ["--grad-var-every", "0", "--quiet"]
    if command == "evaluate" and "--k" in argv:
        argv[argv.index("--k") + 1] = "10"
    if command == "reproduce" and "--epochs" not in argv:
        argv += ["--epochs", "1", "--k", "10", "--quiet"]
    return argv


def test_the_readme_is_a_front_door_with_the_test_command():
    assert len(README) <= 10_000
    assert TEST_COMMAND in README  # .ci/run runs this command; keep them in step
    assert [lang for lang, _ in BLOCKS].count("python") >= 1 and len(BLOCKS) >= 9
    # every capability links to its guide, and every guide it links to exists
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert {"docs/guide/training.md", "docs/guide/evaluation.md", "docs/guide/codes.md", "docs/guide/clustering.md",
            "docs/guide/hybrid.md", "docs/guide/estimators.md", "docs/guide/speed.md",
            "docs/guide/reproduce.md"} <= set(links)
    assert all((ROOT / link).is_file() for link in links), links


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}-{lang}" for i, (lang, _) in enumerate(BLOCKS)])
def test_readme_snippet_runs(index, scratch, monkeypatch, capsys):
    lang, body = BLOCKS[index]
    monkeypatch.chdir(scratch)
    if lang == "python":
        code = body.replace("epochs=20", "epochs=1")
        exec(compile(code, f"README block {index}", "exec"), {"__name__": "__main__"})
        return
    assert lang == "bash"
    if TEST_COMMAND in body:
        pytest.skip("the test command itself")
    ran = 0
    for command in commands(body):
        if command.startswith("pip install"):
            continue
        words = shlex.split(command)
        env = {}
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[0] == "discvae":
            argv = substituted(words[1:])
            assert main(argv) == 0, (argv, capsys.readouterr().err)
        elif words[0] == "torchrun":
            at = words.index("-m") + 2  # torchrun's own flags, then -m discvae
            argv = [sys.executable, "-m", "torch.distributed.run", *words[1:at], *substituted(words[at:])]
            proc = subprocess.run(argv, env={**os.environ, **env, "PYTHONPATH": str(ROOT / "src")},
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-2000:]
        else:
            raise AssertionError(f"README command not handled by this test: {command}")
        ran += 1
    assert ran
