"""Intra-op threads fit the work: one for a step too small to share, ``threads`` / ``--threads N`` to override,
never more than the cores the process may use, torch's setting restored after training, free to change on resume."""
from __future__ import annotations

import os

import pytest
import torch

from discvae import Callback, Config, InputError, load_dataset, train
from discvae.cli import main
from discvae.speed import SMALL_STEP_FLOPS, choose_threads, usable_cores


def test_choose_threads_caps_requests_and_gives_small_steps_one_thread(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    assert choose_threads(None, int(SMALL_STEP_FLOPS) - 1) == 1
    assert choose_threads(None, int(SMALL_STEP_FLOPS) * 10) == min(torch.get_num_threads(), cores)
    assert choose_threads(1, None) == 1
    assert choose_threads(cores + 7, None) == cores  # never more than the usable cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun: the cores shared out between the ranks
    assert usable_cores() == 1 and choose_threads(4, None) == 1


class Threads(Callback):
    def on_epoch_end(self, state, row):
        self.seen = torch.get_num_threads()


def test_training_runs_on_the_chosen_threads_restores_torchs_and_may_change_them_on_resume(tmp_path, capsys):
    data, before = load_dataset("digits"), torch.get_num_threads()
    seen = Threads()
    cfg = Config(dataset="digits", latent_dim=8, epochs=1, batch_size=64, grad_var_every=0, out=str(tmp_path / "a"))
    train(cfg, progress=False, data=data, callbacks=[seen])
    assert seen.seen == 1 and torch.get_num_threads() == before  # the quick start's size: one thread
    cfg = Config(**{**cfg.__dict__, "threads": 99, "out": str(tmp_path / "b")})
    train(cfg, progress=False, data=data, callbacks=[seen])
    assert seen.seen == min(99, len(os.sched_getaffinity(0))) and torch.get_num_threads() == before
    run = str(tmp_path / "c")
    base = ["train", "--dataset", "digits", "--latent-dim", "8", "--batch-size", "64", "--grad-var-every", "0",
            "--quiet", "--out", run]
    assert main([*base, "--epochs", "1", "--threads", "1"]) == 0
    assert main(["train", "--resume", "--out", run, "--epochs", "2", "--threads", "2", "--quiet"]) == 0
    with pytest.raises(InputError, match="threads"):
        Config(threads=0).check()
