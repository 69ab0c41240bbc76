"""Helpers shared by the step benchmarks: their command line, the paper's models on random images, one Adam
step as a closure, and medians over interleaved rounds."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from discvae import build_model


def parse_args(doc: str, rounds: int = 7, steps: int = 5, more=None, threads: int = 0) -> argparse.Namespace:
    """``--rounds``, ``--steps``, ``--threads`` (applied here) and what ``more(parser)`` adds; also seeds torch."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch threads (default: {threads or 'torch' + chr(39) + 's choice'})")
    if more:
        more(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def paper_model(latent: str, c: int, batch: int, arch: str = "fc"):
    """The paper's ``arch`` model (Table I: ``fc`` or ``cnn``) with ``c`` latent units, its Adam optimiser (lr 1e-3)
    and a batch of random images."""
    model = build_model(arch, (1, 28, 28), latent, c)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.rand(batch, 1, 28, 28)


def adam_step(model, optimizer, x, estimator, **options):
    """A closure running one optimisation step of ``model`` on ``x`` with ``estimator(q, f, **options)`` (a
    function or a registered name)."""
    def step():
        loss = model(x, estimator, **options).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_it(fn, reps: int) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def interleaved_medians(fns: dict, rounds: int, reps: int) -> dict:
    """Median seconds per call of each of ``fns`` (name -> callable), rounds alternating between them so that
    machine noise hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_it(fn, reps))
    return {name: statistics.median(ts) for name, ts in times.items()}
