"""Cost of one training step of FC_CVAE (c = 100 classes, batch 2048) with ``exact`` against ``importance`` M = 1.

``exact`` sums q(z|x) f(z) over all 100 states, decoding each state once for the whole batch (100 decoder rows
instead of 2048) and computing ln p(x|z) for every (state, example) pair as one [100, 784] x [784, 2048] matmul.
Rounds alternate between the two estimators so machine noise hits both alike; medians are reported, and the ratio
exact / importance (target: <= 1).

    python benchmarks/bench_exact.py [--rounds 7] [--steps 5] [--threads N]
"""
from __future__ import annotations

import argparse

import torch
from timing import adam_step, interleaved_medians

from discvae import build_model

B, C = 2048, 100


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("fc", (1, 28, 28), "categorical", C)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(B, 1, 28, 28)

    t = interleaved_medians({name: adam_step(model, opt, x, name, num_samples=1) for name in ("importance", "exact")},
                            args.rounds, args.steps)
    t_imp, t_exact = t["importance"], t["exact"]
    print(f"threads                  {torch.get_num_threads()}")
    print(f"importance M=1 step      {t_imp * 1e3:.1f} ms")
    print(f"exact (100 states) step  {t_exact * 1e3:.1f} ms")
    print(f"ratio exact / importance {t_exact / t_imp:.2f}   (target <= 1)")


if __name__ == "__main__":
    main()
