"""Build and query time and memory of ``discvae index`` / ``discvae search`` at 10^6 and 10^7 items: exact Hamming
k-NN over 64-bit codes (faiss ``IndexBinaryFlat``, what ``HashIndex`` holds) against exact float k-NN (faiss
``IndexFlatL2``) over 64-dim and 784-dim float32 vectors, in the same process.

The codes and vectors are random (uniform bytes, uniform floats): an exact flat search costs the same whatever the
values. The 784-dim float side is measured on a subsample of 10^6 vectors (10^7 of them are 31 GB, more than this
machine has) and its time and memory are scaled to 10^7 linearly (a flat index stores every vector and a query scans
all of them). Build = ``add`` (copying the codes or vectors into the index); ``HashIndex.fit`` also runs the encoder,
whose rate is measured separately on the paper's FC encoder (784-1024-64, untrained: the cost is the same) and
reported as the time it would add per 10^6 images. Memory: the index's bytes and the growth of the resident set
while it is filled. Query: ``--queries`` queries, k = ``--k``, the median of ``--rounds`` interleaved rounds; the
float searches use BLAS (``--blas-threshold``), the fastest exact float k-NN faiss has on this CPU.

    python benchmarks/bench_search.py [--sizes 1000000 10000000] [--queries 1000] [--k 10] [--rounds 1]
        [--threads N] [--blas-threshold 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import faiss
import numpy as np
import torch

from discvae import build_model
from discvae.applications.retrieval import pack

BITS, DIMS, SUBSAMPLE = 64, (64, 784), 1_000_000
MB = 1e6


def resident() -> int:
    """Bytes of this process's resident set."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def filled(index, rows: np.ndarray) -> tuple[float, int]:
    """Seconds to ``add`` ``rows`` to ``index`` and the growth of the resident set meanwhile."""
    before, start = resident(), time.perf_counter()
    index.add(rows)
    return time.perf_counter() - start, resident() - before


def query_times(indexes: dict, queries: dict, k: int, rounds: int) -> dict:
    """Median seconds of ``indexes[name].search(queries[name], k)``, rounds interleaved across the names."""
    times = {name: [] for name in indexes}
    for _ in range(rounds):
        for name, index in indexes.items():
            start = time.perf_counter()
            index.search(queries[name], k)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def encoder_rate(n: int = 20_000, batch: int = 1024) -> float:
    """Images per second through ``VAE.codes`` of the FC model with 64 Bernoulli bits, plus ``pack``."""
    model = build_model("fc", (1, 28, 28), "bernoulli", BITS)
    x = torch.rand(n, 1, 28, 28)
    pack(model.codes(x[:batch], batch).numpy())  # warm-up
    start = time.perf_counter()
    pack(model.codes(x, batch).numpy())
    return n / (time.perf_counter() - start)


def measure(n: int, args, rng) -> dict:
    """Name -> (build s, index bytes, resident growth, query s) at ``n`` items, the 784-dim side scaled from
    ``SUBSAMPLE`` when ``n`` is larger."""
    indexes, queries, build = {}, {}, {}
    codes = rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)
    indexes["hamming"], queries["hamming"] = faiss.IndexBinaryFlat(BITS), codes[:args.queries].copy()
    build["hamming"] = filled(indexes["hamming"], codes)
    del codes
    scale = {"hamming": 1.0}
    for dim in DIMS:
        m = n if n * dim * 4 <= args.max_float_bytes else min(n, SUBSAMPLE)
        vectors = rng.random((m, dim), dtype=np.float32)
        name = f"float{dim}"
        indexes[name], queries[name], scale[name] = faiss.IndexFlatL2(dim), vectors[:args.queries].copy(), n / m
        build[name] = filled(indexes[name], vectors)
        del vectors
    times = query_times(indexes, queries, args.k, args.rounds)
    out = {}
    for name, index in indexes.items():
        item = index.code_size if name == "hamming" else index.d * 4
        seconds, grown = build[name]
        out[name] = (seconds * scale[name], index.ntotal * item * scale[name], grown * scale[name],
                     times[name] * scale[name], scale[name] > 1)
    indexes.clear()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="items (default 10^6 10^7)")
    p.add_argument("--queries", type=int, default=1000, help="queries per search (default 1000)")
    p.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved query rounds, median reported (default 1)")
    p.add_argument("--max-float-bytes", type=float, default=4e9, help="float vectors above this many bytes are "
                   f"measured on {SUBSAMPLE} of them and scaled (default 4e9)")
    p.add_argument("--threads", type=int, help="faiss (OpenMP) and torch threads (default their choice)")
    p.add_argument("--blas-threshold", type=int, default=20, help="faiss.cvar.distance_compute_blas_threshold: "
                   "float searches with at least this many queries use BLAS (default 20; faiss 1.15's own 128000 "
                   "ran 1000 queries 10x slower here)")
    args = p.parse_args()
    faiss.cvar.distance_compute_blas_threshold = args.blas_threshold
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    print(f"{args.queries} queries, k = {args.k}, {BITS}-bit codes, faiss {faiss.__version__} with "
          f"{faiss.omp_get_max_threads()} threads, torch {torch.__version__} with {torch.get_num_threads()}")
    rate = encoder_rate()
    print(f"encoder (FC 784-1024-{BITS}, codes + pack): {rate:,.0f} images/s = {1e6 / rate:.1f} s per 10^6 images")
    rng = np.random.default_rng(0)
    results = {n: measure(n, args, rng) for n in args.sizes}
    print(f"{'items':>10s} {'index':>9s} {'build s':>8s} {'MB':>9s} {'RSS+ MB':>9s} {'query s':>8s}")
    for n, by_name in results.items():
        for name, (build, size, grown, query, scaled) in by_name.items():
            print(f"{n:10d} {name:>9s} {build:8.3f} {size / MB:9.0f} {grown / MB:9.0f} {query:8.2f}"
                  + ("   (scaled from 10^6)" if scaled else ""))
    for n, by_name in results.items():
        ham = by_name["hamming"]
        print(f"N = {n:.0e}: hamming query {ham[3]:.2f} s, build {ham[0]:.3f} s (+ encoding {n / rate:.0f} s), "
              f"{ham[1] / MB:.0f} MB; " + "; ".join(
                  f"{name}: query x{v[3] / ham[3]:.1f}, memory x{v[1] / ham[1]:.0f}" for name, v in by_name.items()
                  if name != "hamming"))


if __name__ == "__main__":
    main()
