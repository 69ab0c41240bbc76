"""Fuzzing a run's files (README, "Safety and failure behaviour"): a real checkpoint and config.json are mutated --
every entry removed, of the wrong type, out of range, of the wrong shape, NaN; bytes flipped -- and every command
that reads a run runs on each. Each must exit 0, or 2 with one line on stderr; never a traceback, a crash or a hang;
and leave the run's files as they were, except those the command owns.

The commands run in-process (``discvae.cli.main``), their figures unrendered, on a deterministic sample of
``SAMPLE`` mutations (``DISCVAE_FUZZ=all`` runs every one); flipped bytes and a crafted Adam state, which could
crash native code, run in one subprocess with a timeout.
"""
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from discvae import runs
from discvae.cli import main

SAMPLE = 16  # mutations run in-process (of about 350)
REMOVE = object()  # a mutation's value: delete the entry
OWNED = {"resume": {runs.CONFIG, runs.METRICS, runs.CHECKPOINT}, "evaluate": {"eval.json"}}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny 1-epoch digits run (hidden width 16, so every command is quick)."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["train", "--dataset", "digits", "--latent-dim", "8", "--hidden", "16", "--epochs", "1",
                 "--batch-size", "256", "--grad-var-every", "0", "--out", str(run), "--quiet"]) == 0
    return run


def commands(run, out) -> dict:
    """Every command that reads a run, its outputs in ``out`` (the resumed run trains one more epoch)."""
    return {"evaluate": ["evaluate", run, "--k", "2"],
            "reconstruct": ["reconstruct", run, "--out", out / "r.png", "--n", "2", "--rows", "1"],
            "plot": ["plot", run, "--out", out / "plot", "--n", "2", "--rows", "1"],
            "resume": ["train", "--resume", "--out", run, "--epochs", "2", "--quiet"],
            "encode": ["encode", run, "--out", out / "codes.npz"],
            "index": ["index", run, "--data", "digits:test", "--out", out / "index"],
            "retrieval": ["retrieval", run, "--out", out / "retrieval", "--per-class", "1"],
            "clustering": ["clustering", run, "--out", out / "clustering"]}


def checkpoint_mutations(state: dict) -> dict:
    """Name -> a function changing a copy of the checkpoint ``state`` in place."""
    def put(*path, value):
        def change(s):
            for key in path[:-1]:
                s = s[key]
            if value is REMOVE:
                del s[path[-1]]
            else:
                s[path[-1]] = value(s[path[-1]]) if callable(value) else value
        return change

    out = {}
    for key in state:
        out[f"{key} removed"] = put(key, value=REMOVE)
        out[f"{key} a string"] = put(key, value="x")
        out[f"{key} None"] = put(key, value=None)
    for key in ("epoch", "step"):
        out.update({f"{key} {v}": put(key, value=v) for v in (-4, 0, 10**30, True, 1.5)})
    out.update({f"elapsed {v}": put("elapsed", value=v) for v in (-1.0, math.nan, math.inf, 3)})
    for key in ("shuffle", "rng"):
        out[f"{key} short"] = put(key, value=torch.zeros(3, dtype=torch.uint8))
        out[f"{key} float"] = put(key, value=lambda t: t.float())
    out["cuda_rng a string inside"] = put("cuda_rng", value=["x"])
    out["history of ints"] = put("history", value=[1])
    out["history row without epoch"] = put("history", value=lambda h: [{k: v for k, v in h[0].items()
                                                                          if k != "epoch"}])
    out["history row with a string"] = put("history", value=lambda h: [{**h[0], "test_kl": "x"}])
    out["history NaN value"] = put("history", value=lambda h: [{**h[0], "test_kl": math.nan}])
    out["history two rows"] = put("history", value=lambda h: h + h)
    for name in state["model"]:
        out[f"model {name} removed"] = put("model", name, value=REMOVE)
        out[f"model {name} wrong shape"] = put("model", name, value=torch.zeros(2))
        out[f"model {name} NaN"] = put("model", name, value=lambda t: torch.full_like(t, math.nan))
        out[f"model {name} int64"] = put("model", name, value=lambda t: t.long())
        out[f"model {name} transposed"] = put("model", name, value=lambda t: t.T.contiguous() if t.dim() == 2
                                              else t[None])
    out["model extra tensor"] = put("model", "extra", value=torch.zeros(1))
    optimizer = state["optimizer"]
    for key in optimizer:
        out[f"optimizer {key} removed"] = put("optimizer", key, value=REMOVE)
    out["optimizer param_groups a dict"] = put("optimizer", "param_groups", value=lambda g: g[0])
    out["optimizer two param groups"] = put("optimizer", "param_groups", value=lambda g: g + g)
    for key in optimizer["param_groups"][0]:
        out[f"optimizer group {key} removed"] = put("optimizer", "param_groups", 0, key, value=REMOVE)
        out[f"optimizer group {key} NaN"] = put("optimizer", "param_groups", 0, key, value=math.nan)
    out["optimizer group params short"] = put("optimizer", "param_groups", 0, "params", value=lambda p: p[:-1])
    out["optimizer group betas large"] = put("optimizer", "param_groups", 0, "betas", value=(5.0, 5.0))
    out["optimizer state index 99"] = put("optimizer", "state", value=lambda st: {**st, 99: st[0]})
    out["optimizer state index a string"] = put("optimizer", "state", value=lambda st: {**st, "0": st[0]})
    for index in (0, len(optimizer["state"]) - 1):
        for key in optimizer["state"][index]:
            where = ("optimizer", "state", index, key)
            out[f"optimizer {index} {key} removed"] = put(*where, value=REMOVE)
            out[f"optimizer {index} {key} wrong shape"] = put(*where, value=torch.zeros(2))
            out[f"optimizer {index} {key} NaN"] = put(*where, value=lambda t: torch.full_like(t, math.nan))
            out[f"optimizer {index} {key} negative"] = put(*where, value=lambda t: -1 - t.abs())
            out[f"optimizer {index} {key} float64"] = put(*where, value=lambda t: t.double())
    for key in state["config"]:
        out[f"config {key} removed"] = put("config", key, value=REMOVE)
        out[f"config {key} a list"] = put("config", key, value=[])
    return out


def config_mutations(config: dict) -> dict:
    """Name -> the text of a mutated ``config.json``."""
    out = {}
    for key, value in config.items():
        out[f"config.json {key} removed"] = {k: v for k, v in config.items() if k != key}
        out[f"config.json {key} a list"] = {**config, key: []}
        wrong = {str: ["nope", ""], int: [-1, 0, 10**30], float: [-1.0, math.nan, math.inf, 1e308],
                 dict: [{"nope": 1}, {"num_samples": -1}], bool: [2], type(None): [-1, "x"]}[type(value)]
        out.update({f"config.json {key} {v!r}": {**config, key: v} for v in wrong})
    out = {name: json.dumps(c) for name, c in out.items()}
    out["config.json nested deeply"] = '{"x": ' + "[" * 50000 + "]" * 50000 + "}"
    out["config.json not UTF-8"] = b'{"dataset": "\xff"}'
    out["config.json truncated"] = json.dumps(config)[:40]
    return out


def files(run) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != runs.LOCK}


def restore(run, originals: dict) -> None:
    for p in run.iterdir():
        if p.name not in originals and p.name != runs.LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for name, data in originals.items():
        (run / name).write_bytes(data)


@pytest.fixture
def unrendered(monkeypatch):
    """Figures are made but neither laid out nor rasterised (matplotlib's time, which no mutation reaches): each is
    written as an empty file."""
    import matplotlib.figure

    import discvae.figures

    monkeypatch.setattr(matplotlib.figure.Figure, "tight_layout", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(discvae.figures, "save_figure", lambda path, fig: runs.write_text(path, ""))


def test_every_command_survives_mutated_run_files(pristine, tmp_path, capsys, unrendered):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    originals = files(run)
    state = torch.load(run / runs.CHECKPOINT, weights_only=True)
    state.pop(runs.DIGEST)
    mutations = {**{f"checkpoint {n}": c for n, c in checkpoint_mutations(state).items()},
                 **config_mutations(json.loads(originals[runs.CONFIG]))}
    names = sorted(mutations)
    if os.environ.get("DISCVAE_FUZZ") != "all":
        names = random.Random(27).sample(names, SAMPLE)
    failures = []
    for name in names:
        restore(run, originals)
        mutation = mutations[name]
        if callable(mutation):
            changed = copy.deepcopy(state)
            try:
                mutation(changed)
            except (KeyError, IndexError, TypeError, AttributeError, RuntimeError):
                continue  # not applicable to this entry
            runs.save_checkpoint(run / runs.CHECKPOINT, changed)
        else:
            (run / runs.CONFIG).write_bytes(mutation if isinstance(mutation, bytes) else mutation.encode())
        damaged = files(run)
        for command, argv in commands(run, tmp_path / "out").items():
            capsys.readouterr()
            try:
                code = main([str(a) for a in argv])
            except BaseException as err:  # noqa: BLE001 - a traceback is what this test looks for
                failures.append(f"{name} / {command}: raised {type(err).__name__}: {err}")
                continue
            err = capsys.readouterr().err
            if code not in (0, 2) or (code == 2 and len(err.strip().splitlines()) != 1) or "Traceback" in err:
                failures.append(f"{name} / {command}: exit {code}, stderr {err!r}")
            owned = OWNED.get(command, set()) if code == 0 else set()
            now = files(run)
            changed_files = {f for f in set(now) | set(damaged) if now.get(f) != damaged.get(f)} - owned
            if changed_files:
                failures.append(f"{name} / {command}: exit {code} changed {sorted(changed_files)}")
            restore(run, damaged)
    assert not failures, "\n".join(failures)


SUBPROCESS = textwrap.dedent("""
    import contextlib, io, json, sys
    from pathlib import Path
    import torch
    from discvae import runs
    from discvae.cli import main

    run, out, commands = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    original = (run / runs.CHECKPOINT).read_bytes()
    state = torch.load(run / runs.CHECKPOINT, weights_only=True)
    cases = {"adam exp_avg of shape [2]": None}
    for fraction, count in ((0.0, 1), (0.02, 4000), (0.3, 4000), (0.5, 1), (0.7, 4000), (0.999, 1)):
        cases[f"{count} bytes flipped at {fraction:.1%}"] = (int(fraction * len(original)), count)
    for case, flip in cases.items():
        if flip is None:  # issue 27: the fused Adam kernel read and wrote out of bounds
            state.pop(runs.DIGEST)
            state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
            runs.save_checkpoint(run / runs.CHECKPOINT, state)
        else:
            start, count = flip
            data = bytearray(original)
            data[start:start + count] = bytes(b ^ 0xA5 for b in data[start:start + count])
            (run / runs.CHECKPOINT).write_bytes(bytes(data))
        for command, argv in commands.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            print(json.dumps({"case": case, "command": command, "code": code, "stderr": err.getvalue()}), flush=True)
""")


def test_flipped_bytes_and_a_crafted_adam_state_never_crash(pristine, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    argv = {name: [str(a) for a in a_argv] for name, a_argv in commands(run, tmp_path / "out").items()}
    before = {name: data for name, data in files(run).items() if name != runs.CHECKPOINT}
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(run), str(tmp_path / "out"), json.dumps(argv)],
                          capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    last = results[-1]["case"] + " / " + results[-1]["command"] if results else "the start"
    assert proc.returncode == 0, f"crashed (exit {proc.returncode}) after {last}: {proc.stderr[-2000:]}"
    assert len(results) == 7 * len(argv)
    for r in results:
        assert r["code"] == 2 and len(r["stderr"].strip().splitlines()) == 1, r  # every case is damage
        assert "Traceback" not in r["stderr"], r
        assert ("is corrupt" in r["stderr"] or "cannot read checkpoint" in r["stderr"]
                if "flipped" in r["case"] else "exp_avg of parameter 0 does not match" in r["stderr"]), r
    assert {name: data for name, data in files(run).items() if name != runs.CHECKPOINT} == before
