"""One training step of the paper's FC_BVAE (c = 50 bits, batch 2048, M = 1) in bf16 against fp32; ``--arch cnn``
the same for its CNN_BVAE.

The step is the library's own (``step.forward_fn`` and ``step.train_step``: the networks under autocast with
``precision="bf16"``, weights, gradients, Adam's state and the log-space sums in fp32), on random grey images,
rounds alternating between the two precisions, medians reported. Also the bf16 / fp32 speed of torch's matmul at the
FC step's largest shape (for either ``--arch``), and the loss of both precisions on the same batch.

    python benchmarks/bench_precision.py [--rounds 7] [--steps 5] [--threads N] [--arch fc|cnn]

The last line is ``bf16/fp32 step speed ratio R``. On a CPU without native bf16 (neither AVX512-BF16 nor AMX) it
still measures, and says so: the ratio there shows why training refuses ``--precision bf16`` on such a CPU.
"""
from __future__ import annotations

import torch
from timing import interleaved_medians, paper_model, parse_args

from discvae import Config, make_estimator
from discvae.speed import adam, fast_bf16
from discvae.step import forward_fn, train_step

B, C = 2048, 50


def main():
    args = parse_args(__doc__, more=lambda p: p.add_argument("--arch", choices=("fc", "cnn"), default="fc",
                                                                 help="the Table I architecture (default fc)"))
    model, _, x = paper_model("bernoulli", C, B, args.arch)
    x = (x < 0.5).float()
    estimator = make_estimator("importance", num_samples=1)
    steps, losses = {}, {}
    for p in ("fp32", "bf16"):
        replica, _, _ = paper_model("bernoulli", C, B, args.arch)
        replica.load_state_dict(model.state_dict())
        forward, optimizer = forward_fn(replica, estimator, Config(precision=p)), adam(replica.parameters(), 1e-3)
        torch.manual_seed(1)
        losses[p] = forward(x, {}).neg_elbo.item()
        steps[f"step {p}"] = lambda forward=forward, optimizer=optimizer: train_step(optimizer, forward, x, {})
    a, w = torch.randn(B, 784), torch.randn(784, 1024)
    steps["matmul fp32"] = lambda: a @ w
    steps["matmul bf16"] = lambda: a.bfloat16() @ w.bfloat16()
    t = interleaved_medians(steps, args.rounds, args.steps)
    shape = "784-1024-50 / 50-1024-784" if args.arch == "fc" else "Table I's CNN, c = 50"
    print(f"threads {torch.get_num_threads()}, {args.arch.upper()}_BVAE ({shape}), batch {B}, importance M = 1, "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    if not fast_bf16(torch.device("cpu")):
        print("this CPU has no native bf16 (neither AVX512-BF16 nor AMX): bf16 is emulated, which is why training "
              "refuses --precision bf16 here")
    for name, seconds in t.items():
        print(f"{name:14s} {seconds * 1e3:8.1f} ms")
    print(f"-ELBO of one batch: fp32 {losses['fp32']:.3f}, bf16 {losses['bf16']:.3f} (same samples)")
    print(f"bf16/fp32 matmul speed ratio {t['matmul fp32'] / t['matmul bf16']:.2f} ({B}x784 @ 784x1024, with the "
          "casts)")
    print(f"bf16/fp32 step speed ratio {t['step fp32'] / t['step bf16']:.2f}")


if __name__ == "__main__":
    main()
