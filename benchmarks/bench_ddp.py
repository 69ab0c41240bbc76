"""Multi-process training on one machine: 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2 threads.

Both train the same run from the command line on random grey images (``--rows`` of them, saved as an .npz): the
paper's FC_BVAE (c = 50 bits, importance M = 1, batch 2048) and the 200-bit linear model (DisARM M = 2, dynamic
binarisation, batch 50). The time per step is read from the runs' ``metrics.csv`` (training time of the last epoch,
evaluation excluded, the first epoch a warm-up); rounds alternate between the two set-ups; medians.

    python benchmarks/bench_ddp.py [--rounds 3] [--rows 16384]

The last line is ``2x1 / 1x2 step speed ratio R`` for FC_BVAE (above 1: the two ranks are faster).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MODELS = {"fc_bvae": ["--arch", "fc", "--latent-dim", "50", "--batch-size", "2048"],
          "linear200": ["--arch", "linear", "--latent-dim", "200", "--batch-size", "50", "--estimator", "disarm",
                        "--num-samples", "2", "--binarize", "dynamic", "--lr", "1e-4"]}
SETUPS = {"2 ranks x 1 thread": (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], "1"),
          "1 process x 2 threads": ([], "2")}


def seconds_per_step(folder: Path, data: Path, flags: list, launcher: list, threads: str) -> float:
    """Train 2 epochs into a new run in ``folder``; the second epoch's training seconds per step."""
    out = Path(tempfile.mkdtemp(dir=folder))
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, *launcher, "-m", "discvae", "train", "--dataset", str(data), "--epochs", "2",
                    "--grad-var-every", "0", "--device", "cpu", "--quiet", "--out", str(out / "run"), *flags],
                   env=env, check=True, capture_output=True)
    with open(out / "run" / "metrics.csv") as fh:
        first, second = list(csv.DictReader(fh))
    return (float(second["time"]) - float(first["time"])) / (int(second["step"]) - int(first["step"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16384, help="training images (default 16384: 8 FC steps)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data.npz"
        rng = np.random.default_rng(0)
        np.savez(data, x_train=rng.random((args.rows, 784), dtype=np.float32),
                 x_test=rng.random((256, 784), dtype=np.float32))
        times = {(m, s): [] for m in MODELS for s in SETUPS}
        for _ in range(args.rounds):
            for (model, setup), ts in times.items():
                ts.append(seconds_per_step(Path(folder), data, MODELS[model], *SETUPS[setup]))
    t = {key: statistics.median(ts) for key, ts in times.items()}
    print(f"{args.rounds} rounds, {args.rows} images, medians of the second epoch's seconds per step")
    for (model, setup), seconds in t.items():
        print(f"{model:10s} {setup:22s} {seconds * 1e3:8.2f} ms / step")
    two, one = SETUPS
    for model in MODELS:
        print(f"{model}: 2x1 / 1x2 step speed ratio {t[model, one] / t[model, two]:.2f}")
    print(f"2x1 / 1x2 step speed ratio {t['fc_bvae', one] / t['fc_bvae', two]:.2f}")


if __name__ == "__main__":
    main()
