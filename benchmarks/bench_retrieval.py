"""Cost of ranking 1,000 queries by the Hamming distance of 64-bit codes, against a float32 Euclidean k-NN search
over the same items, in the same process.

Two databases: the 60,000 MNIST training images (64-bit codes: LSH of their pixels, since the cost does not depend
on the codes; the Euclidean search on their 784 float32 pixels) with the 1,000 test queries of the retrieval
protocol, and 1,000,000 random 64-bit codes and random float32 vectors of ``--dim`` (default 784, 3.1 GB; faiss
copies them) with 1,000 random queries. Timed, as medians over ``--rounds`` interleaved rounds:

* ``hamming top-k``: faiss ``IndexBinaryFlat``, exact k nearest (k = each of ``--k``, default 10 -- a query grid
  -- and 1000, what P@1000 needs);
* ``popcount distances``: every query-item distance by ``retrieval.hamming`` (XOR and popcount of 64-bit words),
  in the blocks ``retrieval.evaluate_codes`` uses for the mAP;
* ``full ranking``: the same plus a stable sort of every row (NumPy's radix sort for small integers);
* ``euclidean top-k``: faiss ``IndexFlatL2``, exact k nearest by squared Euclidean distance.

    python benchmarks/bench_retrieval.py [--data-dir DIR] [--k 10 1000] [--dim 784] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import argparse
import time
from collections import deque

import faiss
import numpy as np
from timing import interleaved_medians

from discvae import load_dataset
from discvae.applications.retrieval import BLOCK_ITEMS, LSH, hamming, pack, select_queries

N_QUERIES, N_RANDOM, BITS = 1000, 1_000_000, 64
FULL = "full ranking (popcount + sort)"


def blocks(packed_q: np.ndarray, packed_db: np.ndarray):
    """The distance blocks of ``evaluate_codes``: ``[B, N]`` for B queries at a time."""
    block = max(1, BLOCK_ITEMS // len(packed_db))
    for i in range(0, len(packed_q), block):
        yield hamming(packed_q[i:i + block], packed_db)


def searches(packed_q, packed_db, float_q, float_db, ks) -> dict:
    """Name -> a closure running one of the timed operations over all queries (the top-k searches once per k)."""
    binary, euclidean = faiss.IndexBinaryFlat(BITS), faiss.IndexFlatL2(float_db.shape[1])
    binary.add(packed_db)
    euclidean.add(float_db)
    return {**{f"hamming top-{k} (faiss)": lambda k=k: binary.search(packed_q, k) for k in ks},
            "popcount distances": lambda: deque(blocks(packed_q, packed_db), maxlen=0),
            FULL: lambda: deque((np.argsort(d, 1, kind="stable") for d in blocks(packed_q, packed_db)), maxlen=0),
            **{f"euclidean top-{k} (faiss)": lambda k=k: euclidean.search(float_q, k) for k in ks}}


def report(title: str, times: dict, ks) -> None:
    """Each time, and each Euclidean search against the Hamming search with the same k and the full ranking."""
    print(title)
    for name, t in times.items():
        print(f"  {name:32s} {t:8.3f} s")
    for k in ks:
        t = times[f"euclidean top-{k} (faiss)"]
        print(f"  euclidean top-{k} / hamming top-{k}: {t / times[f'hamming top-{k} (faiss)']:.1f}   "
              f"euclidean top-{k} / full Hamming ranking: {t / times[FULL]:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="folder holding mnist/ (default $DISCVAE_DATA, else ~/.cache/discvae)")
    p.add_argument("--k", type=int, nargs="+", default=[10, 1000], help="neighbours of the top-k searches "
                   "(default 10 and 1000)")
    p.add_argument("--dim", type=int, default=784, help="dimension of the random float vectors (default 784)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians reported (default 3)")
    p.add_argument("--threads", type=int, help="faiss (OpenMP) threads (default faiss's choice)")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"{N_QUERIES} queries, {BITS}-bit codes, faiss {faiss.__version__} with "
          f"{faiss.omp_get_max_threads()} threads, NumPy {np.__version__} (one thread)")

    data = load_dataset("mnist", args.data_dir)
    queries = select_queries(data.y_test.numpy(), N_QUERIES // 10)
    pixels_db, pixels_q = data.x_train.flatten(1).numpy(), data.x_test[queries].flatten(1).numpy()
    lsh = LSH(BITS).fit(pixels_db)
    mnist = searches(pack(lsh.transform(pixels_q)), pack(lsh.transform(pixels_db)), pixels_q, pixels_db, args.k)
    report(f"MNIST: {len(pixels_db)} training images, 784-dim float32 pixels",
           interleaved_medians(mnist, args.rounds, 1), args.k)

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    codes = rng.integers(0, 256, (N_RANDOM + N_QUERIES, BITS // 8), dtype=np.uint8)
    vectors = rng.random((N_RANDOM + N_QUERIES, args.dim), dtype=np.float32)
    print(f"(random data drawn in {time.perf_counter() - start:.1f} s)")
    million = searches(codes[N_RANDOM:], codes[:N_RANDOM], vectors[N_RANDOM:], vectors[:N_RANDOM], args.k)
    report(f"random: {N_RANDOM} items, {args.dim}-dim float32 vectors", interleaved_medians(million, args.rounds, 1),
           args.k)


if __name__ == "__main__":
    main()
