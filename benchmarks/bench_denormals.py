"""One training step of a trained run's model with denormals kept (torch's default) against flushed to 0
(``speed.flush_denormals``, which ``train`` and ``evaluate`` use).

A trained categorical model can make enough denormals (floats below 2^-126) to slow its step, which x86 CPUs
compute many times slower; a fresh model makes few. So this times the model of a run directory, on the first 2048
training images (as the run binarises them), with lr 0 so that the weights stay as trained; rounds alternate,
medians reported.

    python benchmarks/bench_denormals.py RUN [--rounds 3] [--steps 2] [--threads N]

The last line is ``denormals kept/flushed step time ratio R``.
"""
from __future__ import annotations

import torch
from timing import adam_step, interleaved_medians, parse_args

from discvae import make_estimator
from discvae.likelihoods import binarize
from discvae.speed import flush_denormals
from discvae.training import load_run


def main():
    args = parse_args(__doc__, rounds=3, steps=2, more=lambda p: p.add_argument("run", help="a run directory"))
    cfg, model, data = load_run(args.run)  # checkpoints are replaced atomically: a run still training reads whole
    model.train()
    x = binarize(data.x_train[:2048], cfg.binarize)
    step = adam_step(model, torch.optim.Adam(model.parameters(), lr=0.0), x,
                     make_estimator(cfg.estimator, **cfg.estimator_options))

    def flushed():
        with flush_denormals():
            step()
    t = interleaved_medians({"kept": step, "flushed": flushed}, args.rounds, args.steps)
    print(f"threads {torch.get_num_threads()}, {args.run}: {cfg.arch} {cfg.latent} c = {cfg.latent_dim}, "
          f"{cfg.estimator}, batch {len(x)}, {args.rounds} rounds x {args.steps} steps, medians")
    print(f"step, denormals kept    {t['kept'] * 1e3:8.1f} ms")
    print(f"step, denormals flushed {t['flushed'] * 1e3:8.1f} ms")
    print(f"denormals kept/flushed step time ratio {t['kept'] / t['flushed']:.2f}")


if __name__ == "__main__":
    main()
