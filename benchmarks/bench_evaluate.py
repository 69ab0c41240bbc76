"""Cost of the IWAE bound (K = 1000) of FC_BVAE (c = 50) on the 10,000 MNIST test images, against the cost of
1000 forward passes of its decoder over the same images, measured in the same run.

The bound decodes N x K latent samples, so 1000 decoder passes over the test set are its floor; the rest is the
encoder (once), sampling, the Bernoulli likelihood and the log-sum-exp. Prints both times and their ratio (target
<= 3).

    python benchmarks/bench_evaluate.py [--run RUN_DIR] [--data-dir DIR] [--k 1000] [--chunk 100]
                                        [--batch-size 500] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch

from discvae import build_model, load_dataset, load_run
from discvae.evaluation import iwae_bound


def decoder_passes(model, n: int, passes: int, block: int) -> float:
    """Seconds for ``passes`` decoder forward passes over ``n`` random codes, ``block`` rows per call."""
    z = torch.randint(0, 2, (n, model.space.dim)).float()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(passes):
            for i in range(0, n, block):
                model.decode(z[i:i + block])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a trained FC_BVAE run directory (default: an untrained one; the cost is the same)")
    p.add_argument("--data-dir", help="folder holding mnist/ (default $DISCVAE_DATA, else ~/.cache/discvae)")
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, help="torch threads (default torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        _, model, data = load_run(args.run)
    else:
        data = load_dataset("mnist", args.data_dir)
        model = build_model("fc", data.x_test.shape[1:], "bernoulli", 50).eval()
    x = data.x_test
    torch.manual_seed(0)
    print(f"FC_BVAE latent {model.space}, {len(x)} test images, K = {args.k}, chunk {args.chunk}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    bound = iwae_bound(model, x, args.k, args.chunk, args.batch_size)
    t_iwae = time.perf_counter() - start
    t_dec = decoder_passes(model, len(x), args.k, args.chunk * args.batch_size)
    print(f"IWAE bound (mean ln p(x) >= {bound.mean().item():.2f}): {t_iwae:.1f} s")
    print(f"{args.k} decoder passes over the test set: {t_dec:.1f} s")
    print(f"ratio: {t_iwae / t_dec:.2f} (target <= 3)")


if __name__ == "__main__":
    main()
