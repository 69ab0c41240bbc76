"""Callbacks in the training loop: a caller's hooks, the progress bar and ``--tensorboard DIR``."""
import csv
import json
import sys

import pytest
import torch

from discvae import Config, load_dataset, train
from discvae.callbacks import Callback
from helpers import assert_one_line_error, run_cli, train_digits

ARGS = dict(dataset="digits", latent_dim=8, epochs=2, batch_size=256)


class Recorder(Callback):
    """Records every call, and what the run directory holds when each epoch's row arrives."""

    def __init__(self):
        self.calls, self.rows, self.steps, self.on_disk = [], [], [], []

    def on_train_start(self, state, cfg):
        self.calls.append("start")
        self.cfg = cfg

    def on_epoch_start(self, state, batches):
        self.calls.append(f"epoch {state.epoch + 1}")
        self.batches = batches

    def on_step_end(self, state, terms):
        self.steps.append((state.step, terms.neg_elbo.item()))

    def on_epoch_end(self, state, row):
        self.calls.append(f"row {state.epoch}")
        self.rows.append(dict(row))
        with open(f"{self.cfg.out}/metrics.csv") as fh:
            epochs = [int(r["epoch"]) for r in csv.DictReader(fh)]
        self.on_disk.append((epochs, torch.load(f"{self.cfg.out}/checkpoint.pt", weights_only=True)["epoch"]))

    def on_train_end(self, state):
        self.calls.append("end")
        self.final = state


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_a_callback_sees_every_epoch_and_the_final_state(tmp_path):
    data = load_dataset("digits")
    recorder = Recorder()
    state = train(Config(**ARGS, out=str(tmp_path / "run")), progress=False, data=data, callbacks=[recorder])
    assert recorder.calls == ["start", "epoch 1", "row 1", "epoch 2", "row 2", "end"]
    assert recorder.final is state and recorder.rows == state.history and [r["epoch"] for r in recorder.rows] == [1, 2]
    batches = -(-len(data.x_train) // 256)
    assert recorder.batches == batches and [s for s, _ in recorder.steps] == list(range(1, 2 * batches + 1))
    # the built-in callbacks ran first: the checkpoint and metrics.csv already hold the epoch a callback sees
    assert recorder.on_disk == [([1], 1), ([1, 2], 2)]
    assert recorder.cfg.out == str(tmp_path / "run") and recorder.cfg.estimator == "importance"
    # watching changes nothing
    plain = train(Config(**ARGS, out=str(tmp_path / "plain")), progress=False, data=data)
    assert torch.equal(params(plain.model), params(state.model))
    assert [{k: v for k, v in r.items() if k != "time"} for r in plain.history] == \
        [{k: v for k, v in r.items() if k != "time"} for r in state.history]

    # resuming a finished run: start and end, no epoch
    again = Recorder()
    train(Config(**ARGS, out=str(tmp_path / "run")), resume=True, progress=False, data=data, callbacks=[again])
    assert again.calls == ["start", "end"] and again.final.epoch == 2


def test_progress_bar_prints_one_line_per_epoch(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--dataset", "digits", "--latent-dim", "8", "--epochs", "2",
                             "--batch-size", "256", "--grad-var-every", "0", "--out", tmp_path / "run")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["epoch 1", "epoch 2"] and lines[2] == str(tmp_path / "run")
    assert "train -ELBO" in lines[0] and "test -ELBO" in lines[0]
    assert "epoch 1/2" in err  # the per-batch bar


def test_tensorboard_writes_event_files_tensorboard_reads(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logs = tmp_path / "tb"
    train_digits(tmp_path / "run", "--epochs", "2", "--grad-var-every", "1", "--tensorboard", logs)
    acc = event_accumulator.EventAccumulator(str(logs))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"test_neg_elbo", "train_neg_elbo", "train_kl", "grad_encoder_var", "time", "step"} <= set(scalars)
    assert "epoch" not in scalars
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    events = acc.Scalars("test_neg_elbo")
    assert [e.step for e in events] == [1, 2]
    assert [e.value for e in events] == pytest.approx([float(r["test_neg_elbo"]) for r in rows], rel=1e-6)
    # not part of the run: it is not saved, and the run resumes without it
    assert "tensorboard" not in json.loads((tmp_path / "run" / "config.json").read_text())
    train_digits(tmp_path / "run", "--epochs", "3", "--resume")
    assert len(list(logs.iterdir())) == 1


def test_tensorboard_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--out", tmp_path / "run", "--tensorboard",
                           tmp_path / "tb")
    assert_one_line_error(code, err, "--tensorboard needs the tensorboard package: pip install tensorboard")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()  # refused before any work


def test_tensorboard_dir_is_checked_before_work(tmp_path, capsys):
    pytest.importorskip("torch.utils.tensorboard")
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--out", tmp_path / "run", "--tensorboard",
                           tmp_path / "file")
    assert_one_line_error(code, err, "is not a directory")
    assert not (tmp_path / "run").exists()
