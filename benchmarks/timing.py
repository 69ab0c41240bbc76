"""Timing helpers shared by the benchmarks: one Adam step as a closure, and interleaved medians."""
from __future__ import annotations

import statistics
import time


def adam_step(model, optimizer, x, estimator: str, **options):
    """A closure running one optimisation step of ``model`` on ``x`` with ``estimator``."""
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
