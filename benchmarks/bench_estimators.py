"""Cost of one training step of the paper's FC models with every estimator at the same budget, side by side.

FC_BVAE (c = 50 bits) with the Bernoulli estimators and FC_CVAE (c = 100 classes) with the categorical ones, batch
2048, M = 2 decoder evaluations per data point (``exact``: the 100 states once per batch). Rounds alternate between
the estimators so machine noise hits all alike; medians are reported, with each estimator's cost relative to
``importance`` at the same M. This is the clean "time per step" that ``discvae compare`` cannot give when its runs
train at different times on a shared machine.

    python benchmarks/bench_estimators.py [--rounds 3] [--steps 2] [--num-samples 2] [--threads N]
"""
from __future__ import annotations

import torch
from timing import adam_step, interleaved_medians, paper_model, parse_args

from discvae.experiments.compare import parse_spec

B = 2048
MODELS = {  # latent, c, estimator specs
    "FC_BVAE": ("bernoulli", 50, ["importance", "rloo", "disarm", "vimco", "gumbel:tau=0.5", "st-gumbel",
                                  "straight-through"]),
    "FC_CVAE": ("categorical", 100, ["importance", "rloo", "vimco", "gumbel:tau=0.5", "st-gumbel",
                                     "straight-through", "exact"]),
}


def main():
    args = parse_args(__doc__, rounds=3, steps=2, more=lambda p: p.add_argument("--num-samples", type=int, default=2))
    print(f"batch {B}, M = {args.num_samples}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    for name, (latent, c, labels) in MODELS.items():
        model, opt, x = paper_model(latent, c, B)
        specs = [parse_spec(label, args.num_samples) for label in labels]
        t = interleaved_medians({s.label: adam_step(model, opt, x, s.estimator) for s in specs},
                                args.rounds, args.steps)
        print(f"\n{name} (c = {c})\n{'estimator':18s} {'ms/step':>8s} {'/ importance':>12s}")
        for label, seconds in t.items():
            print(f"{label:18s} {seconds * 1e3:8.1f} {seconds / t['importance']:12.2f}")


if __name__ == "__main__":
    main()
