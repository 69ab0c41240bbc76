"""Several seeds trained side by side in one process (``discvae.stacked.train_stacked``) against as many separate
one-thread runs on one core.

Models: the 200-bit benchmark (dynamically binarised MNIST, its first ``--rows`` training images, batch 50, learned
prior, DisARM M = 2, Adam lr 1e-4), ``linear`` and ``nonlinear``, and the README's quick start (the 8x8 digits, fc
256 wide, 16 bits, importance M = 4 with the leave-one-out baseline, batch 64). Per model and round, on one core
(``--core``, every process pinned to it):

- **separate**: ``--seeds`` processes, each ``discvae.train`` of one seed, started together;
- **stacked**: one process, ``train_stacked`` of the same seeds;

all one thread, ``--epochs`` epochs each. The time of a step is read from each run's ``metrics.csv`` (the epochs'
training time, without the test -ELBO after each): the median over the middle epochs (the first and the last left
out, when the separate processes may not all be training), then over the runs. The separate runs make one step
each in that time, the stack one step of every run, so the throughput ratio is the separate runs' time per step over
the stack's. Rounds alternate the two, medians.

    python benchmarks/bench_stacked.py --data-dir DATA [--rounds 3] [--seeds 4] [--rows 3000] [--epochs 6]

The last line is ``stacked/separate throughput ratio R``: the worse of the two 200-bit models'.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ("linear", "nonlinear")
CHILD = """
import json, sys
from discvae import Config, Dataset, load_dataset, train
from discvae.stacked import train_stacked
rows, cfgs = json.loads(sys.argv[1])
cfgs = [Config(**c) for c in cfgs]
full = load_dataset(cfgs[0].dataset, cfgs[0].data_dir)
data = Dataset(full.name, full.x_train[:rows], None, full.x_test[:500], None)
train_stacked(cfgs, data=data) if len(cfgs) > 1 else train(cfgs[0], progress=False, data=data)
"""


def model_settings(args) -> dict:
    """Model name -> (training rows, the settings of its runs)."""
    bits = dict(dataset="mnist", data_dir=args.data_dir, latent_dim=200, prior="learned", binarize="dynamic",
                estimator="disarm", estimator_options={"num_samples": 2}, batch_size=50, lr=1e-4)
    return {**{arch: (args.rows, {**bits, "arch": arch}) for arch in ARCHS},
            "quick start": (1500, dict(dataset="digits", latent_dim=16, hidden=256, batch_size=64,
                                       estimator_options={"num_samples": 4, "baseline": "loo"}))}


def seconds_per_step(run: Path) -> float:
    """The median training time of the middle epochs of ``run`` (``metrics.csv``'s cumulative ``time``) per step."""
    from discvae.runs import read_csv

    rows = read_csv(run / "metrics.csv")
    ends = [(0.0, 0)] + [(r["time"], int(r["step"])) for r in rows]
    per_epoch = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(ends, ends[1:], strict=False)]
    return statistics.median(per_epoch[1:-1])


def run_on_core(core: int, jobs: list[tuple[int, list[dict]]]) -> None:
    """Start every job (training rows, run settings) as a one-thread process pinned to ``core``; wait for all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(job)], env=env,
                              preexec_fn=lambda: os.sched_setaffinity(0, {core})) for job in jobs]
    if any(p.wait() for p in procs):
        raise SystemExit("bench_stacked: a training process failed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $DISCVAE_DATA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=4, help="runs side by side")
    parser.add_argument("--rows", type=int, default=3000, help="MNIST training images (an epoch: rows / 50 steps)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each run (at least 3)")
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="the core (default: the "
                        "last this process may use)")
    args = parser.parse_args()
    print(f"{args.seeds} seeds, stacked in one process and as separate processes, all on core {args.core}, one "
          f"thread; {args.epochs} epochs each, {args.rounds} rounds")
    ratios = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (rows, settings) in model_settings(args).items():
            times = {"separate": [], "stacked": []}
            for k in range(args.rounds):
                for way in times:
                    runs = [Path(folder) / f"{name}-{k}-{way}-{s}".replace(" ", "_") for s in range(args.seeds)]
                    cfgs = [{**settings, "seed": s, "epochs": args.epochs, "grad_var_every": 0, "device": "cpu",
                             "threads": 1, "out": str(run)} for s, run in enumerate(runs)]
                    run_on_core(args.core, [(rows, [c]) for c in cfgs] if way == "separate" else [(rows, cfgs)])
                    times[way].append(statistics.median(seconds_per_step(run) for run in runs))
            separate, stacked = (statistics.median(times[way]) for way in ("separate", "stacked"))
            ratios[name] = separate / stacked
            print(f"{name}: {args.seeds} separate runs {1e3 * separate:.2f} ms per step of each, stacked "
                  f"{1e3 * stacked:.2f} ms per step of all; throughput ratio {ratios[name]:.2f}", flush=True)
    print(f"stacked/separate throughput ratio {min(ratios[arch] for arch in ARCHS):.2f}")


if __name__ == "__main__":
    main()
