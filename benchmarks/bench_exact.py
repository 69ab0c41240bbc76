"""Cost of one training step of FC_CVAE (c = 100 classes, batch 2048) with ``exact`` against ``importance`` M = 1.

``exact`` sums q(z|x) f(z) over all 100 states, decoding each state once for the whole batch (100 decoder rows
instead of 2048) and computing ln p(x|z) for every (state, example) pair as one [100, 784] x [784, 2048] matmul.
Rounds alternate between the two estimators so machine noise hits both alike; medians are reported, and the ratio
exact / importance (target: <= 1).

    python benchmarks/bench_exact.py [--rounds 7] [--steps 5] [--threads N]
"""
from __future__ import annotations

import torch
from timing import adam_step, interleaved_medians, paper_model, parse_args

B, C = 2048, 100


def main():
    args = parse_args(__doc__)
    model, opt, x = paper_model("categorical", C, B)
    t = interleaved_medians({name: adam_step(model, opt, x, name, num_samples=1) for name in ("importance", "exact")},
                            args.rounds, args.steps)
    t_imp, t_exact = t["importance"], t["exact"]
    print(f"threads                  {torch.get_num_threads()}")
    print(f"importance M=1 step      {t_imp * 1e3:.1f} ms")
    print(f"exact (100 states) step  {t_exact * 1e3:.1f} ms")
    print(f"ratio exact / importance {t_exact / t_imp:.2f}   (target <= 1)")


if __name__ == "__main__":
    main()
