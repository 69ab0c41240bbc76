"""Training on 2 processes with torchrun (gloo, one thread each, a free port from ``--standalone``, a timeout so a
hang fails): the parameters equal those of one process with the same global batch, rank 0 alone writes the run, the
2-rank run resumes in 1 process, and resumed on 2 ranks it continues bit for bit. ``encode`` and ``index`` on 2 ranks
write what one process writes.

Tolerance: with the deterministic ``exact`` estimator on grey data the two runs differ only in how the batch's
gradient is summed (two halves averaged by an all-reduce against one pass), i.e. by rounding (~1e-7 relative).
Adam divides by the root of the squared gradients' average, which magnifies rounding in gradients near 0: after the
6 steps here the largest difference measured was 1.6e-6 on one CPU and 3.1e-6 on another (under 1% of the parameters
beyond 1e-7); the test allows 1e-5 (a hundredth of one step's lr, which is what a wrong gradient would move a
parameter by). The single process runs on one thread, as each rank does: a matrix product on two threads sums in
another order, which on an Ice Lake CPU alone moved a parameter by 1.8e-4.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import discvae
from discvae import load_dataset
from discvae.applications.search import HashIndex
from helpers import run_cli, train_digits

TIMEOUT = 240  # seconds; two digits epochs take ~15 s on this machine
LR = 1e-3
# metrics.csv of 2 ranks against 1 process: 1e-4 relative or 1e-6 absolute; measured at most 3e-5 relative, on a
# gradient's mean square of 0.0126 (4e-7 absolute), the train terms within 1e-7 (a rank's rows left out: 4e-4 and more)
METRICS_TOL = 1e-4, 1e-6
FLAGS = ["--dataset", "digits", "--latent", "categorical", "--latent-dim", "10", "--estimator", "exact",
         "--batch-size", "256", "--lr", str(LR), "--grad-var-every", "1", "--quiet"]


def environment(**extra: str) -> dict:
    """This environment with ``extra`` and discvae importable in a subprocess."""
    return {**os.environ, **extra,
            "PYTHONPATH": os.pathsep.join([str(Path(discvae.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


def torchrun(*argv) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m discvae ARGV`` with one thread per rank."""
    env = environment(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "discvae", *map(str, argv)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def model_params(run) -> torch.Tensor:
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return torch.cat([v.reshape(-1) for v in state.values()])


def one_process(capsys, *argv) -> None:
    """``discvae ARGV`` in this process on one thread, as each rank runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(capsys, *argv)[0] == 0
    finally:
        torch.set_num_threads(threads)


def assert_same_metrics(one, two) -> None:
    """metrics.csv of the runs ``one`` and ``two``: the same columns and epochs, every value but the wall time equal
    to ``METRICS_TOL``."""
    rows = {run: list(csv.DictReader((run / "metrics.csv").open())) for run in (one, two)}
    assert len(rows[one]) == len(rows[two]) > 0 and list(rows[one][0]) == list(rows[two][0])
    for a, b in zip(rows[one], rows[two], strict=True):
        assert {k: pytest.approx(float(v), rel=METRICS_TOL[0], abs=METRICS_TOL[1]) for k, v in a.items()
                if k != "time"} == \
               {k: float(v) for k, v in b.items() if k != "time"}


def test_two_ranks_train_as_one_process_and_their_run_resumes_in_one(tmp_path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    result = torchrun("train", *FLAGS, "--epochs", "1", "--out", two)
    assert result.stdout.split() == [str(two)]  # printed by rank 0 only
    assert {p.name for p in two.iterdir()} == {"config.json", "metrics.csv", "checkpoint.pt", ".lock"}
    one_process(capsys, "train", *FLAGS, "--epochs", "1", "--out", one)

    steps = torch.load(two / "checkpoint.pt", weights_only=True)["step"]
    assert steps == torch.load(one / "checkpoint.pt", weights_only=True)["step"] > 1
    diff = (model_params(two) - model_params(one)).abs()
    assert diff.max() < 1e-5, diff.max()
    assert_same_metrics(one, two)  # the train terms summed over both ranks' rows, the test terms by rank 0

    code, _, err = run_cli(capsys, "train", "--resume", "--out", two, "--epochs", "2", "--quiet")
    assert code == 0, err
    assert torch.load(two / "checkpoint.pt", weights_only=True)["step"] == 2 * steps
    assert len((two / "metrics.csv").read_text().splitlines()) == 3


def test_an_uneven_split_over_two_ranks_trains_and_logs_as_one_process(tmp_path, capsys):
    """Batches of 5 rows split 3 / 2: each rank's mean loss is scaled by its share (``Ranks.share``) and the epoch
    sums weigh each rank by its rows, so parameters and metrics.csv equal one process's (10 steps an epoch).

    Over 20 steps Adam magnifies rounding on the few parameters whose gradient is near 0 (measured: 45 of 153674
    beyond 1e-5, at most 1.4e-4), so the check is on the mean difference (measured 3.8e-8) and the 99.9th percentile
    (1.4e-6); unscaled shares gave 2.7e-4 and 5.6e-3."""
    digits = load_dataset("digits")
    data = tmp_path / "fifty.npz"
    np.savez(data, x_train=digits.x_train[:50].numpy(), x_test=digits.x_test[:40].numpy())
    flags = [*FLAGS, "--dataset", data, "--batch-size", "5", "--epochs", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun("train", *flags, "--out", two)
    one_process(capsys, "train", *flags, "--out", one)
    assert torch.load(two / "checkpoint.pt", weights_only=True)["step"] == 20
    diff = (model_params(two) - model_params(one)).abs()
    assert diff.mean() < 1e-6 and diff.quantile(0.999) < 1e-5, (diff.mean(), diff.quantile(0.999))
    assert_same_metrics(one, two)


def test_a_two_rank_run_resumed_on_two_ranks_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    """With a sampling estimator every rank draws from its own stream (rank 0 the checkpoint's, the others seeded by
    seed, rank and epoch), so resuming on the same number of ranks must reproduce the run exactly."""
    flags = ["--dataset", "digits", "--latent", "bernoulli", "--latent-dim", "8", "--estimator", "rloo",
             "--num-samples", "2", "--batch-size", "256", "--binarize", "dynamic", "--grad-var-every", "0", "--quiet"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun("train", *flags, "--epochs", "2", "--out", whole)
    torchrun("train", *flags, "--epochs", "1", "--out", parts)
    torchrun("train", "--resume", "--out", parts, "--epochs", "2", "--quiet")
    assert torch.equal(model_params(whole), model_params(parts))
    metrics = {run: (run / "metrics.csv").read_text().splitlines() for run in (whole, parts)}
    untimed = {run: [row.split(",")[:2] + row.split(",")[3:] for row in rows] for run, rows in metrics.items()}
    assert len(untimed[whole]) == 3 and untimed[whole] == untimed[parts]  # all but the wall time


def test_a_rank_ends_without_interpreter_shutdown_yet_keeps_its_exit_status_and_output(tmp_path):
    """Under torchrun (WORLD_SIZE > 1) ``python -m discvae`` ends with os._exit (gloo's workers can abort an
    interpreter shutdown): the exit status and what was printed must survive it."""
    result = subprocess.run([sys.executable, "-c", "import atexit, sys; from discvae.__main__ import main; "
                             "atexit.register(print, 'shutdown ran'); sys.exit(main())",
                             "evaluate", str(tmp_path / "missing")],
                            env=environment(WORLD_SIZE="2"), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.startswith("discvae evaluate: error:") and len(result.stderr.splitlines()) == 1
    assert "shutdown ran" not in result.stdout  # no interpreter shutdown: atexit handlers do not run


def test_two_ranks_encode_and_index_as_one_process(tmp_path, capsys):
    """Each rank encodes its contiguous share (the index's from a streamed .npz, rank 1 seeking into it); rank 0
    assembles and writes what one process writes."""
    run = train_digits(tmp_path / "run", "--latent-dim", "12")
    data = load_dataset("digits")
    np.savez_compressed(tmp_path / "digits.npz", x=np.concatenate([data.x_train.numpy(), data.x_test.numpy()]))
    two = torchrun("encode", run, "--out", tmp_path / "two.npz", "--batch-size", "100")
    assert two.stdout.splitlines() == [f"{tmp_path / 'two.npz'}: 1797 codes"]
    two = torchrun("index", run, "--data", tmp_path / "digits.npz", "--out", tmp_path / "two", "--batch-size", "100")
    assert two.stdout.splitlines() == [f"{tmp_path / 'two'}: 1797 codes of 12 bits"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        assert run_cli(capsys, "encode", run, "--out", tmp_path / "one.npz")[0] == 0
        assert run_cli(capsys, "index", run, "--data", "digits:all", "--out", tmp_path / "one")[0] == 0
    finally:
        torch.set_num_threads(threads)
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert set(one.files) == set(two.files)
        for key in one.files:
            assert np.allclose(one[key], two[key], rtol=0, atol=1e-6) if key == "probs" else \
                np.array_equal(one[key], two[key]), key
    one, two = (HashIndex.load(tmp_path / name, run) for name in ("one", "two"))
    assert np.array_equal(faiss.vector_to_array(one.index_.xb), faiss.vector_to_array(two.index_.xb))
    assert np.array_equal(one.ids_, two.ids_) and two.data_ == str(tmp_path / "digits.npz")
