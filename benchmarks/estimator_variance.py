"""The encoder-gradient variance of estimators on one trained model, after the learning ones have adapted to it.

The model of a finished (or running) run is held fixed. Each estimator that learns first trains its own parameters
for ``--adapt-steps`` steps on dynamically binarised training batches (its Adam at ``--lr``), as it would beside the
model; then every estimator gives R = ``--repeats`` independent gradients of the loss on one fixed batch (the first
``--batch`` test images, binarised once), and the per-parameter variance of the encoder's part, averaged over its
parameters, is reported with its ratio to ``rloo``'s. Same M decoder evaluations per data point for all but
``rebar`` and ``relax`` (3 per sample: they run with M = 1 beside the others' 2 unless named with ``:num_samples=``).

    python benchmarks/estimator_variance.py runs/NAME --out runs/variance.json \\
        rloo disarm arms double-cv-ls double-cv rodeo-ls rodeo
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from discvae import load_run
from discvae.evaluation import fixed_binarization
from discvae.experiments.compare import parse_spec
from discvae.gradients import gradient_variance
from discvae.likelihoods import binarize


def adapt(model, estimator, x_train, steps: int, batch: int, lr: float, binarization: str) -> None:
    """Train ``estimator``'s own parameters for ``steps`` steps with the model held fixed."""
    params = list(estimator.parameters())
    if not params:
        return
    optimizer = torch.optim.Adam(params, lr=lr)
    model.requires_grad_(False)
    estimator.train()
    try:
        for _ in range(steps):
            x = binarize(x_train[torch.randint(len(x_train), (batch,))], binarization)
            optimizer.zero_grad(set_to_none=True)
            model(x, estimator).loss.backward()
            optimizer.step()
    finally:
        model.requires_grad_(True)
        estimator.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("estimators", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--adapt-steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg, model, data = load_run(args.run)
    x_fixed = fixed_binarization(data.x_test[:args.batch], cfg.binarize, args.seed)
    rows = []
    for text in args.estimators:
        torch.manual_seed(args.seed)
        estimator = parse_spec(text, args.num_samples).estimator
        with torch.no_grad():
            model(x_fixed[:2], estimator)  # sizes a learning one's networks
        start = time.perf_counter()
        adapt(model, estimator, data.x_train, args.adapt_steps, args.batch, args.lr, cfg.binarize)
        adapted = time.perf_counter() - start
        torch.manual_seed(args.seed + 1)
        stats = gradient_variance(model, x_fixed, estimator.eval(), args.repeats)
        rows.append({"estimator": text, "encoder_var": stats["encoder_var"], "decoder_var": stats["decoder_var"],
                     "adapt_seconds": round(adapted, 1)})
        print(f"{text:28s} encoder var {stats['encoder_var']:.4g}  decoder var {stats['decoder_var']:.4g}", flush=True)
    reference = next((r["encoder_var"] for r in rows if r["estimator"] == "rloo"), None)
    for row in rows:
        row["ratio_to_rloo"] = row["encoder_var"] / reference if reference else None
    result = {"run": args.run, "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out")},
              "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
