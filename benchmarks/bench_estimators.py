"""Cost of one training step of the paper's FC models, and of the 200-bit benchmark, with every estimator at the same
budget, side by side.

FC_BVAE (c = 50 bits) with the Bernoulli estimators and FC_CVAE (c = 100 classes) with the categorical ones, batch
2048, M = 2 decoder evaluations per data point (``exact``: the 100 states once per batch); with ``--nonlinear``
instead the 200-bit ``nonlinear`` model of the ARM / RODEO tables (LeakyReLU 0.3) at batch 100 with every Bernoulli
estimator, the learning ones included (their parameters stepped too; ``nvil``, ``rebar`` and ``relax`` at M = 1).
Rounds alternate between the estimators so machine noise hits all alike; medians are reported, with each estimator's
cost relative to ``importance`` at the same M. This is the clean "time per step" that ``discvae compare`` cannot
give when its runs train at different times on a shared machine.

    python benchmarks/bench_estimators.py [--rounds 3] [--steps 2] [--num-samples 2] [--threads N] [--nonlinear]
"""
from __future__ import annotations

import torch
from timing import adam_step, interleaved_medians, paper_model, parse_args

from discvae import build_model
from discvae.experiments.compare import parse_spec

B = 2048
MODELS = {  # latent, c, estimator specs
    "FC_BVAE": ("bernoulli", 50, ["importance", "rloo", "disarm", "vimco", "gumbel:tau=0.5", "st-gumbel",
                                  "straight-through"]),
    "FC_CVAE": ("categorical", 100, ["importance", "rloo", "vimco", "gumbel:tau=0.5", "st-gumbel",
                                     "straight-through", "exact"]),
}


NONLINEAR = ["rloo", "disarm", "arm", "arms", "double-cv-ls", "double-cv", "rodeo-ls", "rodeo", "nvil:num_samples=1",
             "rebar:num_samples=1", "relax:num_samples=1"]


def nonlinear(args) -> None:
    """The 200-bit nonlinear model at batch 100, every Bernoulli estimator, relative to disarm."""
    model = build_model("nonlinear", (784,), "bernoulli", 200, slope=0.3)
    x = (torch.rand(100, 784) < 0.3).float()
    steps = {}
    for spec in [parse_spec(label, args.num_samples) for label in ["disarm", *NONLINEAR]]:
        with torch.no_grad():
            model(x[:2], spec.estimator)  # sizes a learning estimator's networks
        learned = list(spec.estimator.parameters())
        opt = torch.optim.Adam([*model.parameters(), *learned], lr=1e-3)
        steps[spec.label] = adam_step(model, opt, x, spec.estimator)
    t = interleaved_medians(steps, args.rounds, args.steps)
    print(f"\nnonlinear, 200 bits, batch 100\n{'estimator':22s} {'ms/step':>8s} {'/ disarm':>9s}")
    for label, seconds in t.items():
        print(f"{label:22s} {seconds * 1e3:8.1f} {seconds / t['disarm']:9.2f}")


def main():
    def more(p):
        p.add_argument("--num-samples", type=int, default=2)
        p.add_argument("--nonlinear", action="store_true", help="the 200-bit nonlinear model at batch 100")
    args = parse_args(__doc__, rounds=3, steps=2, more=more)
    print(f"M = {args.num_samples}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    if args.nonlinear:
        return nonlinear(args)
    print(f"batch {B}")
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
