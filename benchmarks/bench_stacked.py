"""Several seeds trained side by side in one process (``discvae.stacked.train_stacked``) against one run at a time.

The 200-bit benchmark (dynamically binarised MNIST, batch 50, learned prior, DisARM M = 2, Adam lr 1e-4), ``linear``
and ``nonlinear``, on the first ``--rows`` training images, and the README's quick start (the 8x8 digits, fc 256
wide, 16 bits, importance M = 4 with the leave-one-out baseline, batch 64, 4 epochs): per round, one run with
``discvae.train`` and ``--seeds`` runs stacked with ``train_stacked``, each timed by its own ``metrics.csv`` (the
``time`` column: the epochs' training steps, without the test -ELBO after each), one thread, rounds interleaved,
medians.

R separate one-thread runs sharing one core take turns on it, so together they train at most as many steps per
second as one run alone; the throughput of R runs stacked over that of R separate runs on one core is therefore at
least ``R * (solo time per step) / (stacked time per step)``, the figure reported.

    python benchmarks/bench_stacked.py --data-dir DATA [--rounds 3] [--seeds 4] [--rows 6000]

The last line is ``stacked/separate throughput ratio R``: the worse of the two 200-bit models'.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile

from timing import parse_args

from discvae import Config, Dataset, load_dataset, train
from discvae.stacked import train_stacked

ARCHS = ("linear", "nonlinear")


def main():
    def more(parser):
        parser.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $DISCVAE_DATA)")
        parser.add_argument("--seeds", type=int, default=4, help="runs in the stack")
        parser.add_argument("--rows", type=int, default=6000, help="training images (an epoch: rows / 50 steps)")

    args = parse_args(__doc__, rounds=3, threads=1, more=more)
    full = load_dataset("mnist", args.data_dir)
    mnist = Dataset("mnist", full.x_train[:args.rows], None, full.x_test[:500], None)
    print(f"{args.seeds} seeds stacked against one run alone; 200-bit models: one epoch of {args.rows // 50} steps "
          f"per round; {args.rounds} rounds, {args.threads} thread(s)")
    models = {arch: (mnist, Config(dataset="mnist", arch=arch, latent_dim=200, prior="learned", binarize="dynamic",
                                   estimator="disarm", estimator_options={"num_samples": 2}, batch_size=50, lr=1e-4,
                                   epochs=1, grad_var_every=0, device="cpu", threads=args.threads))
              for arch in ARCHS}
    models["quick start"] = (load_dataset("digits"), Config(
        dataset="digits", latent_dim=16, estimator_options={"num_samples": 4, "baseline": "loo"}, hidden=256,
        epochs=4, batch_size=64, grad_var_every=0, device="cpu", threads=args.threads))
    ratios = {}
    with tempfile.TemporaryDirectory() as folder:
        for arch, (data, base) in models.items():
            times = {"alone": [], "stacked": []}
            for k in range(args.rounds):
                solo = train(dataclasses.replace(base, out=f"{folder}/{arch}-{k}-solo"), progress=False, data=data)
                times["alone"].append(solo.history[-1]["time"] / solo.step)
                stack = train_stacked([dataclasses.replace(base, seed=s, out=f"{folder}/{arch}-{k}-{s}")
                                       for s in range(args.seeds)], data=data)
                times["stacked"].append(stack[0].history[-1]["time"] / stack[0].step)
            alone, stacked = (statistics.median(times[name]) for name in ("alone", "stacked"))
            ratios[arch] = args.seeds * alone / stacked
            print(f"{arch}: one run {1e3 * alone:.3f} ms / step, {args.seeds} stacked {1e3 * stacked:.3f} ms / step "
                  f"({1e3 * stacked / args.seeds:.3f} ms per run-step); throughput ratio {ratios[arch]:.2f}")
    print(f"stacked/separate throughput ratio {min(ratios[arch] for arch in ARCHS):.2f}")


if __name__ == "__main__":
    main()
