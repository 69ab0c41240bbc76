"""One training step on one CPU thread against two, for models from the quick start's to the paper's FC_BVAE.

For each model: its forward FLOPs per step (counted on the meta device, ``speed.step_flops``, the figure
``speed.choose_threads`` compares with ``speed.SMALL_STEP_FLOPS``) and the median time of an Adam step with 1 and
with 2 intra-op threads, rounds interleaved. A step whose matrix products are too small to share runs no faster on
two threads (and much slower when another process holds one of the cores: the second thread waits for it).

    python benchmarks/bench_threads.py [--rounds 5] [--steps 20] [--threads-max 2]
"""
from __future__ import annotations

import torch
from timing import adam_step, interleaved_medians, parse_args

from discvae import build_model, make_estimator
from discvae.latents import LatentSpace
from discvae.speed import SMALL_STEP_FLOPS, step_flops, usable_cores

# (name, arch, input shape, latent, dim, hidden, batch, estimator, options)
MODELS = [
    ("quick start: digits fc 16 bits, B 64, importance M 4 loo", "fc", (1, 8, 8), "bernoulli", 16, None, 64,
     "importance", {"num_samples": 4, "baseline": "loo"}),
    ("200-bit linear, B 50, disarm M 2", "linear", (1, 28, 28), "bernoulli", 200, None, 50, "disarm",
     {"num_samples": 2}),
    ("200-bit nonlinear, B 50, disarm M 2", "nonlinear", (1, 28, 28), "bernoulli", 200, None, 50, "disarm",
     {"num_samples": 2}),
    ("FC_BVAE 50 bits, B 256, importance M 1", "fc", (1, 28, 28), "bernoulli", 50, None, 256, "importance", {}),
    ("FC_BVAE 50 bits, B 2048, importance M 1", "fc", (1, 28, 28), "bernoulli", 50, None, 2048, "importance", {}),
]


def main():
    args = parse_args(__doc__, rounds=5, steps=20,
                      more=lambda p: p.add_argument("--threads-max", type=int, default=2))
    counts = [n for n in (1, 2, 4, 8) if n <= args.threads_max]
    print(f"usable cores {usable_cores()}, SMALL_STEP_FLOPS {SMALL_STEP_FLOPS:.1e}, median of {args.rounds} rounds "
          f"x {args.steps} steps")
    print(f"{'model':58s} {'fwd FLOPs':>10s}" + "".join(f"{f'{n} thr ms':>11s}" for n in counts) + "   1/2 thr")
    for name, arch, shape, latent, dim, hidden, batch, est, options in MODELS:
        space = LatentSpace.parse(latent, dim, 1, "standard")
        estimator = make_estimator(est, **options)
        flops = step_flops(lambda arch=arch, shape=shape, space=space, hidden=hidden: build_model(
            arch, shape, space, hidden=hidden), shape, batch, lambda model, x, estimator=estimator: model(x, estimator))
        model = build_model(arch, shape, space, hidden=hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(batch, *shape).bernoulli()
        step = adam_step(model, optimizer, x, estimator)

        def with_threads(n, step=step):
            def run():
                torch.set_num_threads(n)
                step()
            return run
        times = interleaved_medians({n: with_threads(n) for n in counts}, args.rounds, args.steps)
        ratio = times[1] / times[2] if 2 in times else float("nan")
        print(f"{name:58s} {flops:10.2e}" + "".join(f"{times[n] * 1e3:11.2f}" for n in counts) + f"{ratio:10.2f}")


if __name__ == "__main__":
    main()
