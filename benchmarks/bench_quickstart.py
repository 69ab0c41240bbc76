"""The README's quick-start training, end to end, on an idle machine and beside a busy loop on one core.

Runs ``discvae train --dataset digits --binarize threshold --latent-dim 16 --num-samples 4 --baseline loo --hidden 256
--lr 3e-3 --epochs 40 --batch-size 64 --grad-var-every 0``
(the quick start; ``--epochs`` and extra flags such as ``--threads 2`` may be given) in a fresh process into a
temporary run directory, timing the whole command (start-up, data, training, per-epoch evaluation, the
gradient-variance diagnostic, checkpoints), median of ``--rounds``; then the same while another process spins on
one core (``while True: pass`` pinned to the last usable core). Prints both, each with the command's CPU time
(user + system, all threads: on one thread and a quiet machine about its wall time; the figure that load distorts
least). "Idle" means no process of this benchmark's making: on a shared machine, say what else ran.

    python benchmarks/bench_quickstart.py [--rounds 3] [--epochs 40] [--only idle|busy] [-- EXTRA FLAGS]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = ["train", "--dataset", "digits", "--binarize", "threshold", "--latent-dim", "16", "--num-samples", "4",
           "--baseline", "loo", "--hidden", "256", "--lr", "3e-3", "--batch-size", "64", "--grad-var-every", "0",
           "--quiet"]
BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def cpu_seconds() -> float:
    """User + system CPU time of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(epochs: int, extra: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one quick start in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "discvae", *COMMAND, "--epochs", str(epochs), "--out", str(Path(tmp) / "qs"),
                *extra]
        start, cpu = time.perf_counter(), cpu_seconds()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start, cpu_seconds() - cpu


def report(what: str, rounds: int, epochs: int, extra: list[str]) -> None:
    walls, cpus = zip(*(run_once(epochs, extra) for _ in range(rounds)), strict=True)
    print(f"{what}: median {statistics.median(walls):.1f} s wall ({', '.join(f'{t:.1f}' for t in walls)}), "
          f"{statistics.median(cpus):.1f} s CPU")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--only", choices=("idle", "busy"))
    parser.add_argument("extra", nargs="*", help="more flags of discvae train (after --)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f}, "
          f"{len(os.sched_getaffinity(0))} usable cores, {args.epochs} epochs, extra flags {args.extra or 'none'}")
    if args.only != "busy":
        report("idle", args.rounds, args.epochs, args.extra)
    if args.only != "idle":
        core = max(os.sched_getaffinity(0))
        busy = subprocess.Popen([sys.executable, "-c", BUSY, str(core)])
        try:
            report(f"busy loop on core {core}", args.rounds, args.epochs, args.extra)
        finally:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
