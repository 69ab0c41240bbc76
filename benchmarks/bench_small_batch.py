"""The 200-bit benchmark's training step (linear model, batch 50, DisARM M = 2) against its own matrix products.

Trains the `linear` model (784-200 / 200-784, 200 Bernoulli latents, dynamic binarisation, Adam lr 1e-4) with
``discvae.train`` itself -- the loop, the step, the divergence guard and the callbacks as a run has them -- for
``--steps`` steps per round on random grey images, timing the steps from a callback, and in the same rounds the
four matrix products of one step alone (encoder and decoder forward, the two weight gradients; autograd needs no
input gradient: x is data and z is sampled), rounds interleaved, medians reported. Also times one step of Adam's
three implementations on the model's parameters, the same step written by hand in plain PyTorch (the floor of
PyTorch's building blocks: one function, no library around it), and, with ``--precision bf16``, the bf16 step (and
its GEMMs).

    python benchmarks/bench_small_batch.py [--rounds 7] [--steps 400] [--threads 1] [--precision fp32 bf16]
                                           [--compile]

The last line is ``step/GEMM ratio R``: the fp32 step's time over its GEMMs' time.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from timing import parse_args, time_it

from discvae import Config, Dataset, train
from discvae.callbacks import Callback

B, D, C, M = 50, 784, 200, 2  # batch, pixels, bits, decoder evaluations per data point (one antithetic pair)
WARM_UP = 20  # steps of each run not timed


class StepClock(Callback):
    """Seconds per step over the steps after the first ``WARM_UP`` (median over runs kept by the caller)."""

    def on_epoch_start(self, state, batches):
        self.times = []

    def on_step_end(self, state, terms):
        self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        return (self.times[-1] - self.times[WARM_UP]) / (len(self.times) - 1 - WARM_UP)


def step_timer(data: Dataset, folder: str, **settings):
    """A function training a fresh one-epoch run of the 200-bit linear model on ``data`` and returning its seconds
    per step."""
    runs = iter(range(10**6))

    def run() -> float:
        clock = StepClock()
        cfg = Config(dataset="bench", arch="linear", latent_dim=C, binarize="dynamic", estimator="disarm",
                     estimator_options={"num_samples": M}, epochs=1, batch_size=B, lr=1e-4, grad_var_every=0,
                     device="cpu", out=f"{folder}/{next(runs)}", **settings)
        train(cfg, progress=False, data=data, callbacks=[clock])
        return clock.seconds_per_step()
    return run


def gemms(dtype: torch.dtype):
    """The step's four matrix products in ``dtype``, in the layouts autograd uses, as one function."""
    x, w_enc, b_enc = torch.rand(B, D), torch.randn(C, D), torch.randn(C)
    z, w_dec, b_dec = torch.rand(M * B, C), torch.randn(D, C), torch.randn(D)
    g_dec, g_enc = torch.randn(M * B, D), torch.randn(B, C)
    x, w_enc, b_enc, z, w_dec, b_dec, g_dec, g_enc = (t.to(dtype) for t in (x, w_enc, b_enc, z, w_dec, b_dec,
                                                                               g_dec, g_enc))

    def run():
        torch.addmm(b_enc, x, w_enc.t())  # encoder: eta = x W^T + b
        torch.addmm(b_dec, z, w_dec.t())  # decoder: logits = z W^T + b
        g_dec.t().mm(z)  # dL/dW of the decoder
        g_enc.t().mm(x)  # dL/dW of the encoder
    return run


def hand_written_step(data: Dataset):
    """One DisARM step of the linear model written out in plain PyTorch (binarise, encode, the antithetic pair,
    decode, the Bernoulli likelihood, the KL to the uniform prior, backward, fused Adam), walking through ``data``."""
    enc, dec = torch.nn.Linear(D, C), torch.nn.Linear(C, D)
    optimizer = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-4, fused=True)
    images, batches = data.x_train.flatten(1), iter(range(10**9))

    def step():
        i = next(batches) * B % (len(images) - B + 1)
        x = (torch.rand(B, D) < images[i:i + B]).float()
        eta = enc(x)
        with torch.no_grad():
            p = torch.sigmoid(eta)
            u = torch.rand_like(p)
            b, b_anti = (u < p).float(), (1 - u < p).float()
        logits = dec(torch.cat([b, b_anti]))
        f = (logits * x.repeat(2, 1)).sum(-1) - F.softplus(logits).sum(-1)
        fb, fa = f.chunk(2)
        direction = ((b - b_anti) * torch.sigmoid(eta.abs()) * (eta - eta.detach())).sum(-1)
        kl = C * math.log(2) - (F.softplus(eta) - torch.sigmoid(eta) * eta).sum(-1)
        loss = (kl - 0.5 * (fb + fa) - 0.5 * (fb - fa).detach() * direction).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def adam_steps():
    """One step of each Adam implementation on parameters and gradients of the linear model's sizes."""
    shapes = [(C, D), (C,), (D, C), (D,)]
    steps = {}
    for name, kind in (("single-tensor", {"foreach": False}), ("foreach", {"foreach": True}),
                       ("fused", {"fused": True})):
        params = [torch.randn(s, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        steps[f"adam {name}"] = torch.optim.Adam(params, lr=1e-4, **kind).step
    return steps


def main():
    def more(parser):
        parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
        parser.add_argument("--compile", action="store_true", help="also time the fp32 step with --compile")

    args = parse_args(__doc__, rounds=7, steps=400, more=more, threads=1)
    if "fp32" not in args.precision:
        args.precision.insert(0, "fp32")
    n = args.steps + 1
    data = Dataset("bench", torch.rand(n * B, 1, 28, 28), torch.zeros(n * B), torch.rand(B, 1, 28, 28),
                   torch.zeros(B))
    with tempfile.TemporaryDirectory() as folder:
        fns = {f"step {p}": step_timer(data, f"{folder}/{p}", precision=p) for p in args.precision}
        if args.compile:
            fns["step fp32 compiled"] = step_timer(data, f"{folder}/compiled", compile=True)
            fns["step fp32 compiled"]()  # compiled once before the rounds
        fns["hand-written fp32"] = hand_written_step(data)
        for p in args.precision:
            fns[f"gemms {p}"] = gemms({"fp32": torch.float32, "bf16": torch.bfloat16}[p])
        fns.update(adam_steps())
        # a step function returns its own per-step time; the GEMMs and Adam steps are timed over --steps calls
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(fn() if name.startswith("step") else time_it(fn, args.steps))
    t = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"threads {torch.get_num_threads()}, linear 200-bit model, batch {B}, DisARM M = {M}, "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    for name, seconds in t.items():
        print(f"{name:22s} {seconds * 1e3:8.3f} ms")
    for p in args.precision:
        print(f"{p}: step / its GEMMs {t[f'step {p}'] / t[f'gemms {p}']:.2f}; 10^6 steps in "
              f"{t[f'step {p}'] * 1e6 / 60:.0f} min")
    if "bf16" in args.precision:
        print(f"bf16/fp32 step speed ratio {t['step fp32'] / t['step bf16']:.2f}")
    print(f"hand-written PyTorch: step / its GEMMs {t['hand-written fp32'] / t['gemms fp32']:.2f}; "
          f"discvae's step / hand-written {t['step fp32'] / t['hand-written fp32']:.2f}")
    if args.compile:
        print(f"compiled/eager fp32 step speed ratio {t['step fp32'] / t['step fp32 compiled']:.2f}")
    print(f"step/GEMM ratio {t['step fp32'] / t['gemms fp32']:.2f}")


if __name__ == "__main__":
    main()
