"""Safety and failure behaviour (docs/guide/safety.md): checkpoints never run code, run directories are not
clobbered and have one writer, writes are atomic and durable, training stops at the first non-finite step, and every
bad input ends with one line on stderr and exit status 2 -- never a traceback."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from discvae import runs
from discvae.cli import build_parser, main


class Payload:
    """Unpickling this runs ``touch PATH`` (the attack a shared checkpoint could carry)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result, match):
    code, _, err = result
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert match in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch digits run, copied by each test that changes it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--dataset", "digits", "--latent-dim", "8", "--epochs", "1", "--batch-size", "256",
                 "--grad-var-every", "0", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


@pytest.fixture
def read_only(tmp_path):
    """Make a directory unwritable, even for root (``chattr +i``) where chmod is not enough; undo it afterwards."""
    made = []

    def make(path):
        if os.geteuid() != 0:
            path.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a directory read-only here")
        made.append(path)
        return path

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


# 1. Opening a checkpoint never runs its code.

def commands_reading(run, tmp_path):
    reproduce_out = tmp_path / "repro"
    shutil.copytree(run, reproduce_out / "fc_bvae_mnist")
    return {"evaluate": ["evaluate", run, "--k", "2"], "reconstruct": ["reconstruct", run],
            "plot": ["plot", run, "--out", tmp_path / "figs"], "resume": ["train", "--resume", "--out", run,
                                                                           "--epochs", "2", "--quiet"],
            "reproduce": ["reproduce", "--out", reproduce_out, "--only", "fc_bvae_mnist", "--dataset", "digits",
                          "--epochs", "1", "--k", "2", "--quiet"],
            "encode": ["encode", run, "--out", tmp_path / "codes.npz"],
            "index": ["index", run, "--data", "digits:test", "--out", tmp_path / "index"],
            "retrieval": ["retrieval", run, "--out", tmp_path / "retrieval"],
            "clustering": ["clustering", run, "--out", tmp_path / "clustering"]}


@pytest.mark.parametrize("how", ["payload alone", "payload inside a valid checkpoint"])
def test_a_checkpoint_with_a_code_payload_is_refused_by_every_command(run, tmp_path, capsys, how):
    marker = tmp_path / "PWNED"
    ckpt = torch.load(run / runs.CHECKPOINT, weights_only=True)
    torch.save(Payload(marker) if how == "payload alone" else {**ckpt, "note": Payload(marker)}, run / runs.CHECKPOINT)
    for name, argv in commands_reading(run, tmp_path).items():
        assert_error(cli(capsys, *argv), "refusing checkpoint")
        assert not marker.exists(), f"{name} ran the checkpoint's code"


# 2. --out never overwrites a user's files; 3. one trainer per run directory.

TRAIN = ["train", "--dataset", "digits", "--latent-dim", "8", "--epochs", "1", "--batch-size", "256", "--quiet"]


def test_out_refuses_a_folder_that_is_not_a_discvae_run(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "config.json").write_text("my notes\n")
    assert_error(cli(capsys, *TRAIN, "--out", folder), "not a discvae run")
    assert (folder / "config.json").read_text() == "my notes\n"
    (folder / "config.json").unlink()
    (folder / "README").write_text("project\n")
    assert_error(cli(capsys, *TRAIN, "--out", folder), "not a discvae run")
    assert sorted(p.name for p in folder.iterdir() if p.name != runs.LOCK) == ["README"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, *TRAIN, "--out", empty)[0] == 0


def test_a_run_killed_before_its_first_checkpoint(run, capsys):
    (run / runs.CHECKPOINT).unlink()
    (run / runs.METRICS).unlink()
    assert_error(cli(capsys, "train", "--resume", "--out", run), "start it again without --resume")
    assert cli(capsys, *TRAIN, "--out", run)[0] == 0  # its own config.json may be replaced


def test_a_second_trainer_is_refused_and_told_the_holders_pid(tmp_path, capsys):
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from discvae.runs import run_lock
        with run_lock(sys.argv[1]):
            print("locked", flush=True)
            time.sleep(60)
        """), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_error(cli(capsys, *TRAIN, "--out", folder), f"in use by another discvae process (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait(10)
    assert cli(capsys, *TRAIN, "--out", folder)[0] == 0  # the lock died with its holder


# 4. File-system errors are checked before the work.

def test_read_only_run_directory(run, tmp_path, capsys, read_only):
    read_only(run)
    assert_error(cli(capsys, "train", "--resume", "--out", run, "--epochs", "2"), "cannot write")
    assert_error(cli(capsys, "evaluate", run), "cannot write")
    assert_error(cli(capsys, "reconstruct", run), "cannot write")
    assert_error(cli(capsys, *TRAIN, "--out", run / "sub"), "cannot write")
    assert not (run / "eval.json").exists()


def test_evaluate_checks_its_output_before_computing(run, capsys, monkeypatch):
    import discvae.evaluation as evaluation

    (run / "eval.json").mkdir()
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("computed before checking the output"))
    assert_error(cli(capsys, "evaluate", run), "is a directory")


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "reconstruct a file", "plot a file",
                                  "evaluate a file", "plot into a file"])
def test_paths_that_are_files(tmp_path, capsys, run, case):
    f = tmp_path / "file.txt"
    f.write_text("x")
    argv, match = {"out is a file": ([*TRAIN, "--out", f], "not a directory"),
                   "out under a file": ([*TRAIN, "--out", f / "run"], "is a file"),
                   "reconstruct a file": (["reconstruct", f], "not a run directory"),
                   "plot a file": (["plot", f], "not a run directory"),
                   "evaluate a file": (["evaluate", f], "not a run directory"),
                   "plot into a file": (["plot", run, "--out", f], "not a directory")}[case]
    assert_error(cli(capsys, *argv), match)
    assert f.read_text() == "x"


# 5. Malformed run contents.

CONFIG_DAMAGE = {
    "a string for an int": lambda c: {**c, "latent_dim": "eight"},
    "a float for an int": lambda c: {**c, "latent_dim": 8.0},
    "null for a string": lambda c: {**c, "dataset": None},
    "a string for options": lambda c: {**c, "estimator_options": "num_samples=2"},
    "a list": lambda c: [c],
}


@pytest.mark.parametrize("damage", [*CONFIG_DAMAGE, "invalid UTF-8", "a directory"])
def test_malformed_config(run, tmp_path, capsys, damage):
    path = run / runs.CONFIG
    if damage == "invalid UTF-8":
        path.write_bytes(b'{"dataset": "\xff\xfe"}')
    elif damage == "a directory":
        path.unlink()
        path.mkdir()
    else:
        path.write_text(json.dumps(CONFIG_DAMAGE[damage](json.loads(path.read_text()))))
    for argv in (["evaluate", run, "--k", "2"], ["train", "--resume", "--out", run, "--epochs", "2"],
                 ["reconstruct", run], ["plot", run, "--out", tmp_path / "figs"]):
        assert_error(cli(capsys, *argv), "config.json")


@pytest.mark.parametrize("content", [{"foo": 1}, torch.zeros(3)], ids=["dict without keys", "a tensor"])
def test_checkpoint_without_the_expected_entries(run, tmp_path, capsys, content):
    torch.save(content, run / runs.CHECKPOINT)
    for argv in commands_reading(run, tmp_path).values():
        assert_error(cli(capsys, *argv), "not a discvae checkpoint")


# 6. Options; divergence.

@pytest.mark.parametrize("argv,match", [
    (["--device", "meta"], "unknown device"),
    (["--device", "mps"], "mps"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--latent-dim", "10000000"], "GiB"),
    (["--num-samples", "100000000"], "GiB"),
    (["--lr", "inf"], "--lr must be a positive finite"),
    (["--lr", "nan"], "--lr must be a positive finite"),
    (["--estimator", "gumbel", "--tau", "inf"], "--tau must be a positive finite"),
    (["--estimator", "gumbel", "--tau-anneal", "1", "0.5", "inf"], "schedule"),
    (["--latent", "bernoulli", "--groups", "2"], "--groups applies to a categorical"),
    (["--epochs", "0"], "--epochs must be at least 1"),
])
def test_unusable_options(tmp_path, capsys, argv, match):
    if "mps" in argv and torch.backends.mps.is_available():
        pytest.skip("MPS present")
    assert_error(cli(capsys, *TRAIN, *argv, "--out", tmp_path / "run"), match)
    assert not (tmp_path / "run").exists()


def test_divergence_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(run, capsys):
    before = (run / runs.CHECKPOINT).read_bytes()
    code, _, err = cli(capsys, "train", "--resume", "--out", run, "--epochs", "3", "--lr", "1e30", "--quiet")
    assert_error((code, "", err), "non-finite loss or gradient at epoch 2, step")
    assert "last good checkpoint (epoch 1)" in err and "--resume" in err
    assert (run / runs.CHECKPOINT).read_bytes() == before
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--lr", "1e-4", "--quiet")[0] == 0
    assert json.loads((run / runs.CONFIG).read_text())["lr"] == 1e-4


# 7. Degenerate data.

def test_flat_data_trains_and_is_drawn(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "flat.npz", x_train=rng.random((60, 10), dtype=np.float32))
    run = tmp_path / "run"
    assert cli(capsys, "train", "--dataset", tmp_path / "flat.npz", "--latent-dim", "4", "--epochs", "1",
               "--batch-size", "16", "--out", run, "--quiet")[0] == 0
    assert cli(capsys, "reconstruct", run, "--n", "3", "--rows", "1")[0] == 0
    assert cli(capsys, "plot", run)[0] == 0
    import matplotlib.image as mpimg

    height, width = mpimg.imread(run / "reconstructions.png").shape[:2]
    assert (height, width) == ((2 * 3 + 1) * 11, (3 * 6 + 1) * 11)  # 2 x 5 images, 1 px gaps, scale 56 / 5 -> 11


def test_zero_width_items_are_refused_at_load(tmp_path, capsys):
    np.save(tmp_path / "empty.npy", np.zeros((10, 0, 8), np.float32))
    assert_error(cli(capsys, *TRAIN, "--dataset", tmp_path / "empty.npy", "--out", tmp_path / "run"), "length 0")


# 8. Smaller ones.

def test_leftovers_of_killed_writes_are_removed_on_the_next_start_and_nothing_else(run, capsys):
    stale = run / ".checkpoint.pt.0123456789ab.tmp"  # as atomic_path names its temporaries
    stale.write_bytes(b"half a checkpoint")
    mine = run / ".notes.tmp"
    mine.write_text("a user's file")
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")[0] == 0
    assert not stale.exists() and mine.read_text() == "a user's file"


def test_writes_are_durable(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    runs.write_json(tmp_path / "a.json", {"x": 1})
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the file before the rename, the folder after it
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_written_files_get_the_mode_of_a_plain_open_without_touching_the_umask(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        def refuse(mask):
            raise AssertionError("the umask was read or set")

        monkeypatch.setattr(os, "umask", refuse)
        runs.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path):
    # as a terminal would: a suite started in the background (nohup, `&`) passes SIGINT on ignored, and Python
    # keeps ignoring it, so the child gets the default disposition back
    proc = subprocess.Popen([sys.executable, "-m", "discvae", *TRAIN, "--out", str(tmp_path / "run")],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 30
    # send Ctrl-C once torch's libraries are mapped: the import of torch is under way, the interpreter (and its
    # SIGINT handler) long up; a machine without /proc falls back to waiting
    while maps.exists() and "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    if not maps.exists():
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "discvae: interrupted", err


def test_mean_baseline_with_a_last_batch_of_one(tmp_path, capsys):
    assert cli(capsys, *TRAIN, "--batch-size", "1499", "--baseline", "mean", "--out", tmp_path / "run")[0] == 0


def test_resume_with_fewer_epochs_than_done_is_refused_and_changes_nothing(run, capsys):
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")[0] == 0
    config = (run / runs.CONFIG).read_text()
    assert_error(cli(capsys, "train", "--resume", "--out", run, "--epochs", "1"), "already trained 2 epochs")
    assert (run / runs.CONFIG).read_text() == config


# 9. Conventions.

def test_version(capsys):
    from discvae import __version__

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"discvae {__version__}"


def test_every_flag_of_every_subcommand_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in commands.items()
               for a in sub._actions if a.dest != "help" and a.option_strings and not a.help]
    assert not missing


# 10. A run's files as untrusted input end to end (issue 27).

def resign(run, change):
    """Rewrite ``run``'s checkpoint after ``change(state)`` (in place), with a valid digest, so that what is tested
    is the check of the content, not the digest."""
    state = torch.load(run / runs.CHECKPOINT, weights_only=True)
    state.pop(runs.DIGEST, None)
    change(state)
    runs.save_checkpoint(run / runs.CHECKPOINT, state)


def snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != runs.LOCK}


@pytest.mark.parametrize("target", ["checkpoint.pt", "config.json", "metrics.csv", ".lock"])
def test_no_other_command_writes_over_a_runs_own_files(run, capsys, target):
    before = snapshot(run)
    assert_error(cli(capsys, "encode", run, "--out", run / target), "it is a file of the run")
    assert_error(cli(capsys, "reconstruct", run, "--out", run / target), "it is a file of the run")
    assert snapshot(run) == before


def test_no_command_writes_into_a_run_that_is_training(run, tmp_path, capsys):
    before = snapshot(run)
    with runs.run_lock(run):
        for argv in (["evaluate", run, "--k", "2"], ["reconstruct", run], ["plot", run],
                     ["encode", tmp_path / "run-codes", "--out", run / "codes.npz"]):
            assert_error(cli(capsys, *argv), f"in use by another discvae process (pid {os.getpid()})")
    assert snapshot(run) == before


@pytest.mark.parametrize("content", [[".x.tmp"], ["README"], [".lock", "README"]])
def test_train_out_refusing_a_directory_leaves_it_as_it_was(tmp_path, capsys, content):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in content:
        (folder / name).write_text(f"my {name}\n")
    assert_error(cli(capsys, *TRAIN, "--out", folder), "not a discvae run")
    assert {p.name: p.read_text() for p in folder.iterdir()} == {name: f"my {name}\n" for name in content}


def test_a_failed_start_in_an_empty_directory_leaves_no_lock(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_error(cli(capsys, *TRAIN, "--out", folder, "--dataset", tmp_path / "missing.npz"), "no such file")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_non_finite_parameters_are_refused_by_every_command(run, tmp_path, capsys, where):
    def poison(state):
        if where == "weights":
            state["model"]["decoder.2.bias"][3] = float("nan")
        else:
            state["optimizer"]["state"][7]["exp_avg_sq"][0] = float("inf")
    resign(run, poison)
    for argv in commands_reading(run, tmp_path).values():
        assert_error(cli(capsys, *argv), "non-finite weights" if where == "weights" else "exp_avg_sq of parameter 7")
    assert not (run / "eval.json").exists()


def test_config_json_and_the_checkpoint_must_agree(run, tmp_path, capsys):
    config = json.loads((run / runs.CONFIG).read_text())
    (run / runs.CONFIG).write_text(json.dumps({**config, "latent": "categorical"}))  # same tensor shapes
    for name, argv in commands_reading(run, tmp_path).items():
        assert_error(cli(capsys, *argv), "with a different latent" if name == "resume" else "disagree on latent")


MALFORMED = {
    "rng of the wrong size": lambda s: s.update(rng=torch.zeros(7, dtype=torch.uint8)),
    "rng of the wrong type": lambda s: s.update(rng=s["rng"].float()),
    "history of non-rows": lambda s: s.update(history=[1]),
    "param_groups not a list": lambda s: s["optimizer"].update(param_groups=s["optimizer"]["param_groups"][0]),
    "a negative epoch": lambda s: s.update(epoch=-4),
    "a NaN elapsed": lambda s: s.update(elapsed=float("nan")),
    "int64 weights": lambda s: s["model"].update({"decoder.2.bias": s["model"]["decoder.2.bias"].long()}),
    "a bool for an int": lambda s: s.update(epoch=True),
    "a changed Adam setting": lambda s: s["optimizer"]["param_groups"][0].update(eps=float("nan")),
    "a negative lr": lambda s: s["optimizer"]["param_groups"][0].update(lr=-1e-3),
    "a bool lr": lambda s: s["optimizer"]["param_groups"][0].update(lr=False),
    "a tensor lr": lambda s: s["optimizer"]["param_groups"][0].update(lr=torch.zeros(2)),
}


@pytest.mark.parametrize("damage", MALFORMED)
def test_malformed_checkpoint_entries_are_refused_before_anything_is_written(run, tmp_path, capsys, damage):
    resign(run, MALFORMED[damage])
    before = snapshot(run)
    assert_error(cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet"), "checkpoint")
    assert_error(cli(capsys, "evaluate", run, "--k", "2"), "checkpoint")
    assert snapshot(run) == before


def test_a_learning_rate_annealed_to_zero_is_a_checkpoint_like_any_other(run, capsys):
    """A schedule of one's own (a callback setting the optimizer's lr) may end at lr 0, which Adam accepts: the run
    still evaluates and resumes (resuming sets the lr of config.json again)."""
    resign(run, lambda s: s["optimizer"]["param_groups"][0].update(lr=0.0))
    assert cli(capsys, "evaluate", run, "--k", "2")[0] == 0
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")[0] == 0
    assert torch.load(run / runs.CHECKPOINT, weights_only=True)["optimizer"]["param_groups"][0]["lr"] > 0


def test_flipped_bytes_are_corruption_not_divergence(run, capsys):
    data = bytearray((run / runs.CHECKPOINT).read_bytes())
    middle = len(data) // 2  # inside the encoder's weights
    data[middle:middle + 4000] = bytes(b ^ 0x5A for b in data[middle:middle + 4000])
    (run / runs.CHECKPOINT).write_bytes(data)
    for argv in (["evaluate", run, "--k", "2"], ["train", "--resume", "--out", run, "--epochs", "2", "--quiet"]):
        code, _, err = cli(capsys, *argv)
        assert_error((code, "", err), "is corrupt")
        assert "diverge" not in err and "--lr" not in err


@pytest.mark.parametrize("command", [["evaluate", "RUN"], ["plot", "RUN", "--out", "OUT"], ["reconstruct", "RUN"],
                                     ["retrieval", "RUN", "--out", "OUT"], ["clustering", "RUN", "--out", "OUT"]])
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seeds_out_of_range(run, tmp_path, capsys, command, seed):
    argv = [run if a == "RUN" else tmp_path / "out" if a == "OUT" else a for a in command]
    assert_error(cli(capsys, *argv, "--seed", seed), "--seed must be between 0 and")


@pytest.mark.parametrize("argv", [["evaluate", "RUN", "--k", "100000000", "--chunk", "100000000"],
                                  ["reconstruct", "RUN", "--rows", "100000"],
                                  ["plot", "RUN", "--rows", "100000"]])
def test_work_that_cannot_fit_in_memory_is_refused_with_the_estimate(run, capsys, argv):
    assert_error(cli(capsys, *[run if a == "RUN" else a for a in argv]), "GiB of memory, more than the")
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("damage,match", [
    (lambda c: json.dumps(c)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}", "nested more than 32 levels deep"),
    (lambda c: json.dumps({**c, "latent_dim": 10**30}), "too large"),
    (lambda c: json.dumps({**c, "hidden": 10**30}), "--hidden must be at least 1 and at most"),
], ids=["deeply nested", "huge latent_dim", "huge hidden"])
def test_config_values_that_overflow(run, tmp_path, capsys, damage, match):
    (run / runs.CONFIG).write_text(damage(json.loads((run / runs.CONFIG).read_text())))
    for argv in commands_reading(run, tmp_path).values():
        assert_error(cli(capsys, *argv), match)


@pytest.mark.parametrize("argv,match", [
    (["--latent", "bernoulli", "--capacity", "bernoulli=1:10", "--capacity", "bernoulli=2:10"],
     "--capacity is given more than once for bernoulli"),
    (["--latent", "categorical:4+gaussian:2", "--prior", "mixture"], "--estimator importance is for discrete"),
    (["--latent", "categorical:4+gaussian:2", "--prior", "mixture", "--estimator", "exact"],
     "--prior mixture sums its categorical out"),
    (["--latent", "gaussian", "--estimator", "importance"], "has no discrete block"),
])
def test_combinations_the_readme_rules_out(tmp_path, capsys, argv, match):
    unsized = [a for i, a in enumerate(TRAIN) if "--latent-dim" not in TRAIN[max(i - 1, 0):i + 1]]
    assert_error(cli(capsys, *unsized, *argv, "--out", tmp_path / "run"), match)
    assert not (tmp_path / "run").exists()


def test_channel_last_images_are_read_as_channels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x_train=rng.random((40, 6, 5, 3), dtype=np.float32))
    run = tmp_path / "run"
    assert cli(capsys, "train", "--dataset", tmp_path / "rgb.npz", "--latent-dim", "4", "--hidden", "16",
               "--epochs", "1", "--batch-size", "16", "--out", run, "--quiet")[0] == 0
    assert cli(capsys, "reconstruct", run, "--n", "2", "--rows", "1")[0] == 0
    from discvae.training import load_run

    assert load_run(run)[2].x_train.shape[1:] == (3, 6, 5)
    np.save(tmp_path / "ambiguous.npy", np.zeros((10, 3, 8, 3), np.float32))
    assert_error(cli(capsys, *TRAIN, "--dataset", tmp_path / "ambiguous.npy", "--out", tmp_path / "r2"),
                 "cannot tell the channel axis")


@pytest.mark.parametrize("damage", ["missing", "a row short", "empty", "no time column"])
def test_metrics_csv_is_rebuilt_from_the_checkpoint(run, tmp_path, capsys, monkeypatch, damage):
    import discvae.figures as figures

    history = torch.load(run / runs.CHECKPOINT, weights_only=True)["history"]
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")[0] == 0
    good = (run / runs.METRICS).read_text()
    path = run / runs.METRICS
    if damage == "missing":
        path.unlink()
    elif damage == "a row short":
        path.write_text("".join(good.splitlines(keepends=True)[:-1]))
    elif damage == "empty":
        path.write_text("")
    else:
        runs.write_csv(path, [{k: v for k, v in row.items() if k != "time"} for row in runs.read_csv(path)])
    drawn = {}
    monkeypatch.setattr(figures, "convergence", lambda path, histories: drawn.update(histories))
    assert cli(capsys, "plot", run, "--out", tmp_path / "figs")[0] == 0
    assert [row["epoch"] for row in drawn["run"]] == [1, 2] and "time" in drawn["run"][0]
    assert drawn["run"][0] == history[0]
    assert cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")[0] == 0  # the final epoch
    assert path.read_text() == good


def test_under_torchrun_only_rank_0_prints_the_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert cli(capsys, "evaluate", "/nonexistent/run") == (2, "", "")
    monkeypatch.setenv("RANK", "0")
    assert_error(cli(capsys, "evaluate", "/nonexistent/run"), "not a run directory")


@pytest.mark.parametrize("command", ["reconstruct", "plot"])
def test_reconstruct_and_plot_check_their_output_before_loading(run, tmp_path, capsys, monkeypatch, command):
    import discvae.cli
    import discvae.figures

    for module in (discvae.cli, discvae.figures):
        monkeypatch.setattr(module, "load_run", lambda *a, **k: pytest.fail("loaded before checking the output"))
    f = tmp_path / "file"
    f.write_text("x")
    assert_error(cli(capsys, command, run, "--out", f / "sub" if command == "reconstruct" else f),
                 "is a file" if command == "reconstruct" else "is not a directory")


# 7. Settings files, torchrun's usage errors, one checkpoint per read (issue 49).

def test_settings_files_are_regular_files_or_pipes_of_bounded_size_and_depth(tmp_path, capsys):
    """``--config`` reads a regular file or a pipe (``--config <(echo ...)``) of at most 1 MiB, nested at most 32
    levels deep; a device (``/dev/zero``, which has no end) or more is one line and exit status 2."""
    import threading

    def piped(data: bytes) -> str:
        read, write = os.pipe()

        def feed():
            with open(write, "wb") as fh, contextlib.suppress(BrokenPipeError):
                fh.write(data)
        threading.Thread(target=feed, daemon=True).start()
        return f"/dev/fd/{read}"

    settings = json.dumps({"dataset": "digits", "latent_dim": 4}).encode()
    code, out, _ = cli(capsys, "train", "--config", piped(settings), "--print-config")
    assert code == 0 and json.loads(out)["latent_dim"] == 4
    (tmp_path / "big.json").write_text(" " * (1 << 20) + "{}")
    (tmp_path / "nested.json").write_text('{"augment": ' + "[" * 33 + "]" * 33 + "}")
    for path, why in (("/dev/zero", "not a regular file"), (tmp_path, "not a regular file"),
                      (piped(b" " * (3 << 20)), "larger than 1048576 bytes"),
                      (tmp_path / "big.json", "larger than 1048576 bytes"),
                      (tmp_path / "nested.json", "nested more than 32 levels deep"),
                      (tmp_path / "missing.json", "No such file or directory")):
        assert_error(cli(capsys, "train", "--config", path, "--print-config"), f"cannot read {path}: {why}\n")


def test_under_torchrun_a_usage_error_is_printed_by_rank_0_alone(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert cli(capsys, "train", "--bogus") == cli(capsys, "index", "run") == (2, "", "")
    monkeypatch.setenv("RANK", "0")
    assert_error(cli(capsys, "train", "--bogus"), "discvae: error: unrecognized arguments: --bogus")


def test_a_snapshot_of_a_run_reads_one_checkpoint_while_training_replaces_it(run, tmp_path, monkeypatch):
    """``index`` and ``search`` take the codes and the digest from one reading of the checkpoint: one replaced
    (renamed over it, as training does) between the hashing and the loading is not seen by either."""
    digest, state = runs.run_digest(run), runs.load_checkpoint(run)
    later = tmp_path / "later"
    shutil.copytree(run, later)
    assert main(["train", "--resume", "--out", str(later), "--epochs", "2", "--quiet"]) == 0
    read = runs._read_checkpoint

    def replaced_meanwhile(source, path, device):
        os.replace(later / runs.CHECKPOINT, run / runs.CHECKPOINT)
        return read(source, path, device)
    monkeypatch.setattr(runs, "_read_checkpoint", replaced_meanwhile)
    ckpt, seen = runs.run_snapshot(run)
    assert seen == digest and ckpt["epoch"] == state["epoch"] == 1
    assert all(torch.equal(ckpt["model"][k], v) for k, v in state["model"].items())
    assert runs.run_digest(run) != digest  # the run moved on
