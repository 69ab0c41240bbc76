"""Fuzzing a run's files (README, "Safety and failure behaviour"): a real checkpoint and config.json are mutated --
every entry removed, of the wrong type, out of range, of the wrong shape, NaN; bytes flipped -- and every command
that reads a run runs on each. Each must exit 0, or 2 with one line on stderr; never a traceback, a crash or a hang;
and leave the run's files as they were, except those the command owns.

The commands run in-process (``discvae.cli.main``), their figures unrendered, on a deterministic sample of
``SAMPLE`` mutations (``DISCVAE_FUZZ=all`` runs every one); flipped bytes and a crafted Adam state, which could
crash native code, run in one subprocess with a timeout.
"""
import copy
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from discvae import runs
from discvae.applications.search import _meta_digest
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


# An index folder (issue 49): its files mutated, swapped, forged, and rebuilds killed at every step.

@pytest.fixture(scope="module")
def indexes(pristine, tmp_path_factory):
    """Index folders of the pristine run (the digits' test split, which is searched, and their train split) and of
    another run (the test split), and the search results of the first."""
    root = tmp_path_factory.mktemp("indexes")
    another = root / "another"
    assert main(["train", "--dataset", "digits", "--latent-dim", "8", "--hidden", "16", "--epochs", "1",
                 "--batch-size", "256", "--grad-var-every", "0", "--seed", "1", "--out", str(another),
                 "--quiet"]) == 0
    for run, split, name in ((pristine, "test", "test"), (pristine, "train", "train"), (another, "test", "other")):
        assert main(["index", str(run), "--data", f"digits:{split}", "--out", str(root / name)]) == 0
    return root


def search(index, run, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["search", str(index), str(run), "--query", "digits:test", "-k", "3"])
    return code, *capsys.readouterr()


def reseal(folder, **entries) -> None:
    """Make ``index.json`` record the files there now (and ``entries``), as a forger would."""
    meta = json.loads((folder / "index.json").read_text())
    meta.update({f"{key}_sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()
                 for key, name in (("codes", "codes.faiss"), ("ids", "ids.npy"))}, **entries)
    (folder / "index.json").write_text(json.dumps({**meta, "sha256": _meta_digest(meta)}))


def index_mutations(indexes) -> dict:
    """Name -> a function changing an index folder (a copy of ``indexes / "test"``) in place."""
    def flip(name, at):
        def change(f):
            data = bytearray((f / name).read_bytes())
            data[int(at * (len(data) - 1))] ^= 0x5A
            (f / name).write_bytes(bytes(data))
        return change

    def cut(name, keep):
        return lambda f: (f / name).write_bytes((f / name).read_bytes()[:int(keep * (f / name).stat().st_size)])

    def ids(array):
        return lambda f: (np.save(f / "ids.npy", array), reseal(f))

    def meta(**entries):
        return lambda f: (f / "index.json").write_text(json.dumps(
            {k: v for k, v in {**json.loads((f / "index.json").read_text()), **entries}.items() if v is not REMOVE}))

    out = {}
    for name in runs.INDEX_FILES:
        out.update({f"{name} flipped at {at:.0%}": flip(name, at) for at in (0.0, 0.1, 0.5, 0.9, 1.0)})
        out.update({f"{name} cut to {keep:.0%}": cut(name, keep) for keep in (0.0, 0.5, 0.99)})
        out[f"{name} with a byte more"] = lambda f, n=name: (f / n).write_bytes((f / n).read_bytes() + b"\0")
        out[f"{name} removed"] = lambda f, n=name: (f / n).unlink()
        for source in ("train", "other"):
            out[f"{name} of the {source} index"] = lambda f, n=name, s=source: shutil.copy(indexes / s / n, f / n)
    for key, value in json.loads((indexes / "test" / "index.json").read_text()).items():
        out.update({f"index.json {key} {v!r}": meta(**{key: v})
                    for v in (REMOVE, None, "x", True, 0, -1, 2**64, 10**30, [], {}, [value])})
    out["index.json run with a line of its own"] = meta(run="r\ndiscvae search: done", digest="0" * 64)
    out["index.json count one less, resealed"] = lambda f: reseal(f, count=296)
    out["index.json nested deeply"] = lambda f: (f / "index.json").write_text("[" * 50000 + "]" * 50000)
    out["index.json a directory"] = lambda f: ((f / "index.json").unlink(), (f / "index.json").mkdir())
    out["index.json not UTF-8"] = lambda f: (f / "index.json").write_bytes(b'{"format": "\xff"}')
    out["codes.faiss of the train index, resealed"] = lambda f: (
        shutil.copy(indexes / "train" / "codes.faiss", f / "codes.faiss"), reseal(f))
    out["codes.faiss of the other run, resealed"] = lambda f: (
        shutil.copy(indexes / "other" / "codes.faiss", f / "codes.faiss"), reseal(f))
    out["codes.faiss header flipped, resealed"] = lambda f: (flip("codes.faiss", 0.0)(f), reseal(f))
    out["codes.faiss cut, resealed"] = lambda f: (cut("codes.faiss", 0.5)(f), reseal(f))
    for name, array in {"floats": np.arange(297.0), "negative": np.arange(297) - 1, "strings": np.arange(297).astype(
            str), "2-D": np.arange(297)[:, None], "objects": np.array([None] * 297), "too many": np.arange(298),
            "too few": np.arange(296), "uint64 beyond int64": np.full(297, 2**63, np.uint64),
            "bools": np.ones(297, bool), "a scalar": np.int64(3), "shuffled": np.arange(297)[::-1]}.items():
        out[f"ids.npy {name}, resealed"] = ids(array)
    out["ids.npy a pickle, resealed"] = lambda f: ((f / "ids.npy").write_bytes(pickle.dumps(list(range(297)))),
                                                   reseal(f))
    return out


# index.json resealed over files that make a valid index: the digests find damage and mix-ups, not forgeries
FORGERIES = {"ids.npy shuffled, resealed", "codes.faiss of the other run, resealed"}


def test_search_survives_mutated_index_files(pristine, indexes, tmp_path, capsys):
    """Every mutation of an index folder ends in one line and exit status 2, or in exit status 0 with the pristine
    results (a mutation that changes nothing, e.g. the other index's identical ids) -- never wrong neighbours, a
    traceback or a crash -- except the forgeries (``FORGERIES``), searched as what they hold; search writes
    nothing."""
    code, expected, _ = search(indexes / "test", pristine, capsys)
    assert code == 0
    failures = []
    for name, mutate in index_mutations(indexes).items():
        folder = tmp_path / "index"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(indexes / "test", folder)
        mutate(folder)
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        try:
            code, out, err = search(folder, pristine, capsys)
        except BaseException as err:  # noqa: BLE001 - a traceback is what this test looks for
            failures.append(f"{name}: raised {type(err).__name__}: {err}")
            continue
        if name in FORGERIES:  # valid indexes: search answers for the codes and ids they hold
            if code != 0 or "Traceback" in err:
                failures.append(f"{name}: exit {code}, stderr {err!r}")
        elif (code, out) != (0, expected) and (code != 2 or len(err.strip().splitlines()) != 1 or "Traceback" in err):
            failures.append(f"{name}: exit {code}, stderr {err!r}" + (" (wrong results)" if code == 0 else ""))
        if {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} != before:
            failures.append(f"{name}: search changed the folder")
    assert not failures, "\n".join(failures)


class Killed(BaseException):
    """A kill: nothing after it runs (the build's own clean-up is switched off too)."""


@pytest.mark.parametrize("step,when,call", [
    ("staging_directory", "after", 1), ("write_bytes", "after", 1), ("write_bytes", "after", 2),
    ("write_json", "before", 1), ("write_json", "after", 1), ("replace_directory", "before", 1),
    ("replace_directory", "after", 1)])
def test_a_rebuild_killed_at_any_step_leaves_the_old_index_or_the_new_one(pristine, indexes, tmp_path, capsys,
                                                                          monkeypatch, step, when, call):
    """A rebuild of an index (the test split's, rebuilt with the train split) killed before or after each step
    of its write leaves a searchable index, the old one up to the swap and the new one from it; the next build
    removes what the killed one left and succeeds."""
    import discvae.applications.search as search_module

    index = tmp_path / "index"
    shutil.copytree(indexes / "test", index)
    results = {which: search(indexes / which, pristine, capsys)[1] for which in ("test", "train")}
    original, calls = getattr(search_module, step), []

    def killed(*args, **kwargs):
        calls.append(step)
        if len(calls) == call and when == "before":
            raise Killed
        value = original(*args, **kwargs)
        if len(calls) == call:
            raise Killed
        return value
    with monkeypatch.context() as patch:
        patch.setattr(search_module, step, killed)
        patch.setattr(search_module, "_remove_index_folder", lambda folder: None)
        with pytest.raises(Killed):
            main(["index", str(pristine), "--data", "digits:train", "--out", str(index)])
    code, out, err = search(index, pristine, capsys)
    swapped = step == "replace_directory" and when == "after"
    assert code == 0 and out == results["train" if swapped else "test"], err
    assert main(["index", str(pristine), "--data", "digits:train", "--out", str(index)]) == 0
    assert search(index, pristine, capsys)[:2] == (0, results["train"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "index"]


def test_a_file_system_that_cannot_swap_folders_keeps_the_old_index(pristine, indexes, tmp_path, capsys,
                                                                    monkeypatch):
    index = tmp_path / "index"
    shutil.copytree(indexes / "test", index)
    monkeypatch.setattr(runs, "_exchange", lambda a, b: False)
    capsys.readouterr()
    assert main(["index", str(pristine), "--data", "digits:train", "--out", str(index)]) == 2
    assert capsys.readouterr().err == (f"discvae index: error: cannot replace {index} in one step on this file "
                                       "system; remove it first or choose another folder\n")
    assert search(index, pristine, capsys)[:2] == (0, search(indexes / "test", pristine, capsys)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "index"]
