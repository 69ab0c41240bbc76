"""Throughput of one training step of the paper's FC_BVAE (c = 50, batch 2048, M = 1) against the GEMM rate.

Prints examples/s and the step's achieved FLOP/s as a fraction of torch's dense matmul FLOP/s, both measured in
this run, interleaved in rounds so machine noise hits both alike; the medians over rounds are reported.

    python benchmarks/bench_train_step.py [--rounds 7] [--steps 5] [--threads N]
"""
from __future__ import annotations

import torch
from timing import adam_step, interleaved_medians, paper_model, parse_args

B, D, H, C = 2048, 784, 1024, 50


def step_flops() -> float:
    """Multiply-adds x 2 of the step's GEMMs: forward, weight gradients, and the input gradients autograd needs
    (not for the data x, nor for the sampled z, which carries no gradient)."""
    layers = [(D, H), (H, C), (C, H), (H, D)]  # encoder 784-1024-50, decoder 50-1024-784
    fwd = sum(2 * B * i * o for i, o in layers)
    input_grads = 2 * B * H * C + 2 * B * H * D  # encoder layer 2, decoder layer 2
    return 2 * fwd + input_grads


def gemm_shapes():
    """The (m, k, n) products of a step: forward, dW = dY^T X and dX = dY W per layer."""
    shapes = []
    for i, o in [(D, H), (H, C), (C, H), (H, D)]:
        shapes += [(B, i, o), (o, B, i)]
    shapes += [(B, C, H), (B, D, H)]
    return shapes


def main():
    args = parse_args(__doc__)
    model, opt, x = paper_model("bernoulli", C, B)

    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in gemm_shapes()]
    gemm_flops = sum(2 * m * k * n for m, k, n in gemm_shapes())

    def gemms():
        for a, b in mats:
            torch.mm(a, b)

    t = interleaved_medians({"step": adam_step(model, opt, x, "importance", num_samples=1), "gemms": gemms},
                            args.rounds, args.steps)
    t_step, t_gemm = t["step"], t["gemms"]
    achieved, peak = step_flops() / t_step, gemm_flops / t_gemm
    print(f"threads              {torch.get_num_threads()}")
    print(f"step time            {t_step * 1e3:.1f} ms  ({B / t_step:,.0f} examples/s)")
    print(f"step GEMM FLOPs      {step_flops() / 1e9:.2f} GFLOP -> {achieved / 1e9:.1f} GFLOP/s")
    print(f"torch GEMM rate      {peak / 1e9:.1f} GFLOP/s (same shapes, {gemm_flops / 1e9:.2f} GFLOP)")
    print(f"fraction of GEMM     {achieved / peak:.2f}   (target >= 0.6)")


if __name__ == "__main__":
    main()
