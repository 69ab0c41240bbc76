"""``discvae retrieval``: the binary codes of Bernoulli runs as hashes for image retrieval, against LSH, PCAH and ITQ.

Protocol (fixed by ``seed``): the queries are ``per_class`` = 100 test images of each class (1,000 for MNIST; for a
small dataset such as the 8x8 ``digits``, up to 100 of each class of its test split), drawn without replacement by
``numpy.random.default_rng(seed)``; the database is the whole training split (60,000 images for MNIST). A database
item is relevant to a query when it has the same label. Items are ranked by the Hamming distance between their codes
(a run's codes: ``VAE.codes``, the bits [q(z_i = 1|x) > 1/2]).

Metrics, means over the queries:

* ``mAP``: sklearn's ``average_precision_score`` of each query over the whole database with minus the Hamming
  distance as score, so that items at the same distance form one threshold (as the IMSAT reference code computes
  it): AP = sum_r (R_r - R_{r-1}) P_r over the distances r;
* ``P@500``, ``P@1000``: the fraction of relevant items among the k nearest (k clipped to the database size; ties at
  the k-th distance broken as faiss's ``IndexBinaryFlat`` returns them);
* ``P@r<=2``: precision of the items within Hamming radius 2, 0 where there are none;
* ``pr``: per radius r = 0..bits, the mean over the queries of the precision (0 where nothing lies within r) and
  the recall of the items within radius r.

Baselines on the same split and code length, fitted on the database's pixels (flattened, centred with their mean):
``lsh`` (signs of random Gaussian projections, Charikar 2002), ``pcah`` (signs of the top principal components) and
``itq`` (PCA-ITQ, Gong & Lazebnik 2011); the PCA-based ones only when the code has at most as many bits as a
pixel vector has entries.
"""
from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score

from ..config import SKLEARN_MAX_SEED, check_seed
from ..criteria import radius_counts
from ..distributions import Bernoulli
from ..errors import InputError
from ..evaluation import fixed_binarization
from ..runs import write_json, write_text
from .codes import code_block, framed_grid, labels_of, load_coded_runs

PER_CLASS, TOP_K, RADIUS = 100, (500, 1000), 2
GRID_QUERIES, GRID_HITS = 8, 10
BLOCK_ITEMS = 1 << 22  # query-database pairs per block of the full ranking (bounds its memory to ~100 MB)
RESULTS, REPORT, PR_FIGURE, GRID_FIGURE = "retrieval.json", "report.md", "pr_curves.png", "query_grid.png"


def select_queries(labels: np.ndarray, per_class: int = PER_CLASS, seed: int = 0) -> np.ndarray:
    """Indices of up to ``per_class`` items of every class, drawn without replacement by
    ``np.random.default_rng(seed)``, class by class in label order."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.concatenate([rng.choice(m, min(per_class, len(m)), replace=False) for m in members])


def pack(bits: np.ndarray) -> np.ndarray:
    """0/1 codes ``[N, b]`` as ``np.packbits`` bytes zero-padded to whole 64-bit words, ``[N, 8 ceil(b / 64)]``
    uint8 (the layout faiss's binary indexes read); the padding adds nothing to any Hamming distance."""
    packed = np.packbits(np.asarray(bits, dtype=np.uint8), axis=-1)
    return np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))


def hamming(packed_q: np.ndarray, packed_db: np.ndarray) -> np.ndarray:
    """d(q, x) = popcount(q XOR x) for every pair of rows of ``pack``ed codes, ``[Q, N]`` uint16."""
    words_q, words_db = packed_q.view(np.uint64), packed_db.view(np.uint64)
    return np.bitwise_count(words_q[:, None, :] ^ words_db[None]).sum(-1, dtype=np.uint16)


def hamming_knn(packed_q: np.ndarray, packed_db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest database rows of every query by Hamming distance (faiss ``IndexBinaryFlat``):
    (distances, indices), each ``[Q, k]``, nearest first."""
    index = faiss.IndexBinaryFlat(packed_db.shape[1] * 8)
    index.add(packed_db)
    return index.search(packed_q, k)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b elementwise, 0 where b = 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def evaluate_codes(q_bits: np.ndarray, q_labels: np.ndarray, db_bits: np.ndarray, db_labels: np.ndarray,
                   top_k=TOP_K, radius: int = RADIUS) -> dict:
    """mAP, P@k for each k of ``top_k``, P@r<=``radius`` and the precision-recall curve over the Hamming radius of
    0/1 query codes ``[Q, b]`` against database codes ``[N, b]`` (see the module docstring)."""
    n_bits = q_bits.shape[1]
    packed_q, packed_db = pack(q_bits), pack(db_bits)
    block = max(1, BLOCK_ITEMS // len(db_bits))
    ap, counts = [], []
    for i in range(0, len(q_bits), block):
        dist = hamming(packed_q[i:i + block], packed_db)
        relevant = q_labels[i:i + block, None] == db_labels[None]
        ap += [average_precision_score(r, -d.astype(np.int32)) for r, d in zip(relevant, dist, strict=True)]
        counts.append(radius_counts(dist, relevant, n_bits))
    found, hits = (np.concatenate(c) for c in zip(*counts, strict=True))
    precision, recall = _ratio(hits, found).mean(0), _ratio(hits, hits[:, -1:]).mean(0)
    nearest = hamming_knn(packed_q, packed_db, min(max(top_k), len(db_bits)))[1]
    correct = db_labels[nearest] == q_labels[:, None]
    return {"mAP": float(np.mean(ap)), **{f"P@{k}": float(correct[:, :k].mean()) for k in top_k},
            f"P@r<={radius}": float(precision[min(radius, n_bits)]),
            "pr": {"radius": list(range(n_bits + 1)), "precision": precision.tolist(), "recall": recall.tolist()}}


class _SignHash(TransformerMixin, BaseEstimator):
    """h(x) = [(x - m) W > 0] with m the mean of the data fitted and W ``[D, n_bits]`` from ``_projection`` of the
    centred data; ``transform`` gives 0/1 uint8 codes ``[N, n_bits]``."""

    def __init__(self, n_bits: int = 64, seed: int = 0):
        self.n_bits, self.seed = n_bits, seed

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float32)
        self.mean_ = X.mean(0)
        self.projection_ = self._projection(X - self.mean_)
        return self

    def transform(self, X) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float32) - self.mean_) @ self.projection_ > 0).astype(np.uint8)


def _principal_directions(Xc: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The top ``n`` principal directions of centred data ``Xc``, as columns ``[D, n]``."""
    return PCA(n, random_state=seed).fit(Xc).components_.T.astype(np.float32)


class LSH(_SignHash):
    """Sign random projections (Charikar 2002): W with i.i.d. N(0, 1) entries drawn by ``default_rng(seed)``."""

    def _projection(self, Xc: np.ndarray) -> np.ndarray:
        return np.random.default_rng(self.seed).standard_normal((Xc.shape[1], self.n_bits)).astype(np.float32)


class PCAH(_SignHash):
    """PCA hashing: W = the top ``n_bits`` principal directions."""

    def _projection(self, Xc: np.ndarray) -> np.ndarray:
        return _principal_directions(Xc, self.n_bits, self.seed)


class ITQ(_SignHash):
    """PCA-ITQ (Gong & Lazebnik 2011): W = W_pca R with the rotation R minimising the quantisation loss
    ||B - V R||_F^2 over B in {-1, 1}^{N x b} and orthogonal R, V = Xc W_pca the data projected on the top b
    principal directions. From a random orthogonal R (the Q of a seeded Gaussian matrix) it alternates, ``n_iter``
    times, B = sgn(V R) and the orthogonal Procrustes solution R = argmin ||V R - B||_F (R = U W^T for the SVD
    V^T B = U S W^T); each step can only lower the loss, recorded after every iteration in ``loss_``."""

    def __init__(self, n_bits: int = 64, seed: int = 0, n_iter: int = 50):
        super().__init__(n_bits, seed)
        self.n_iter = n_iter

    def _projection(self, Xc: np.ndarray) -> np.ndarray:
        w = _principal_directions(Xc, self.n_bits, self.seed)
        v = (Xc @ w).astype(np.float64)
        rotation = np.linalg.qr(np.random.default_rng(self.seed).standard_normal((self.n_bits, self.n_bits)))[0]
        self.loss_ = []
        for _ in range(self.n_iter):
            b = np.where(v @ rotation > 0, 1.0, -1.0)
            rotation = orthogonal_procrustes(v, b)[0]
            self.loss_.append(float(np.square(b - v @ rotation).sum()))
        return (w @ rotation).astype(np.float32)


BASELINES = {"lsh": LSH, "pcah": PCAH, "itq": ITQ}


def baseline_codes(name: str, n_bits: int, seed: int, x_db: np.ndarray, x_q: np.ndarray):
    """Baseline ``name`` fitted on the database pixels ``x_db``: (database codes, query codes), 0/1 uint8."""
    method = BASELINES[name](n_bits, seed).fit(x_db)
    return method.transform(x_db), method.transform(x_q)


def method_codes(runs: dict, x_db: torch.Tensor, x_q: torch.Tensor, seed: int, batch_size: int) -> dict:
    """(name, bits) -> (database codes, query codes) of every run of ``runs`` (name -> (config, model, data)) and
    of every baseline at each run's code length (``pcah`` and ``itq`` only up to the pixel dimension)."""
    codes = {(name, code_block(model).size): tuple(model.codes(fixed_binarization(x, cfg.binarize), batch_size).numpy()
                                           for x in (x_db, x_q)) for name, (cfg, model, _) in runs.items()}
    pixels_db, pixels_q = x_db.flatten(1).numpy(), x_q.flatten(1).numpy()
    for n_bits in sorted({bits for _, bits in codes}):
        for name in BASELINES if n_bits <= pixels_db.shape[1] else ("lsh",):
            codes[name, n_bits] = baseline_codes(name, n_bits, seed, pixels_db, pixels_q)
    return codes


def retrieval(run_dirs: list, out, seed: int = 0, per_class: int = PER_CLASS, batch_size: int = 1024) -> Path:
    """Evaluate the codes of Bernoulli runs as hashes, beside the baselines at their code lengths, by the protocol
    of the module docstring.

    Args:
        run_dirs: trained runs with Bernoulli latents, on one dataset.
        out: the folder for ``retrieval.json``, ``pr_curves.png``, ``query_grid.png`` (the run with the highest
            mAP) and ``report.md``.
        seed: seeds the queries and the ``lsh`` / ``itq`` baselines.
        per_class: queries per class.
        batch_size: images per encoder call.

    Returns:
        The path of ``report.md``.
    """
    if per_class < 1 or batch_size < 1:
        raise InputError("per_class and batch_size must be at least 1", "per_class", "batch_size")
    check_seed(seed, SKLEARN_MAX_SEED)
    out = Path(out)
    runs = load_coded_runs(run_dirs, Bernoulli, BASELINES)
    names, data = list(runs), next(iter(runs.values()))[2]
    db_labels, test_labels = labels_of(data, "train", "retrieval"), labels_of(data, "test", "retrieval")
    queries = select_queries(test_labels, per_class, seed)
    x_db, x_q, q_labels = data.x_train, data.x_test[queries], test_labels[queries]
    codes = method_codes(runs, x_db, x_q, seed, batch_size)
    results = {}
    for (name, n_bits), (db_bits, q_bits) in codes.items():
        start = time.perf_counter()
        metrics = evaluate_codes(q_bits, q_labels, db_bits, db_labels)
        results.setdefault(name, {})[str(n_bits)] = {**metrics, "seconds": round(time.perf_counter() - start, 2)}
    protocol = {"dataset": data.name, "queries": len(queries), "per_class": per_class, "database": len(x_db),
                "seed": seed, "relevant": "same label", "top_k": list(TOP_K), "radius": RADIUS}
    write_json(out / RESULTS, {"protocol": protocol, "runs": names, "results": results})
    bits = {name: code_block(model).size for name, (_, model, _) in runs.items()}
    best = max(names, key=lambda n: results[n][str(bits[n])]["mAP"])
    pr_figure(out / PR_FIGURE, results, names)
    shown = np.linspace(0, len(queries) - 1, GRID_QUERIES).astype(int)  # positions among the queries
    db_bits, q_bits = codes[best, bits[best]]
    hits = hamming_knn(pack(q_bits[shown]), pack(db_bits), min(GRID_HITS, len(x_db)))[1]
    query_grid(out / GRID_FIGURE, x_q[shown], db_labels[hits] == q_labels[shown, None], x_db[torch.from_numpy(hits)])
    return write_report(out, protocol, results, names, best)


def pr_figure(path, results: dict, runs: list[str]) -> None:
    """Precision against recall over the Hamming radius, one panel per code length, every method of ``results``
    (name -> bits -> metrics; the discvae ``runs`` solid, the baselines dashed)."""
    import matplotlib

    from ..figures import save_figure, subplots

    lengths = sorted({int(b) for by_bits in results.values() for b in by_bits})
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(results)}  # one colour per method
    fig, axes = subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), dpi=90, squeeze=False)
    for ax, n_bits in zip(axes[0], lengths, strict=True):
        for name, by_bits in results.items():
            if str(n_bits) in by_bits:
                pr = by_bits[str(n_bits)]["pr"]
                ax.plot(pr["recall"], pr["precision"], "-o" if name in runs else "--", ms=3, lw=1.3, label=name,
                        color=colors[name])
        ax.set(xlabel="recall", ylabel="precision", title=f"{n_bits} bits: Hamming radius 0..{n_bits}",
               xlim=(0, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(path, fig)


def query_grid(path, queries: torch.Tensor, correct: np.ndarray, retrieved: torch.Tensor) -> None:
    """One row per query: the query image (blue frame), then its nearest database images ``retrieved``
    ``[Q, k, ...]``, framed red where ``correct`` ``[Q, k]`` is False (another class)."""
    frames = [(i, 0, "tab:blue") for i in range(len(queries))] + [
        (i, j + 1, "red") for i, j in zip(*np.nonzero(~correct), strict=True)]
    framed_grid(path, [torch.cat([q[None], r]) for q, r in zip(queries, retrieved, strict=True)], frames,
                f"query | its {correct.shape[1]} nearest database images by Hamming distance (red: another class)")


def _fmt_row(name: str, n_bits: str, m: dict) -> str:
    return (f"| {name} | {n_bits} | {m['mAP']:.4f} | " + " | ".join(f"{m[f'P@{k}']:.4f}" for k in TOP_K)
            + f" | {m[f'P@r<={RADIUS}']:.4f} |")


def write_report(out: Path, protocol: dict, results: dict, runs: list[str], best: str) -> Path:
    """``out/report.md``: the protocol, one table row per method and code length, and the two figures."""
    head = ("| method | bits | mAP | " + " | ".join(f"P@{k}" for k in TOP_K) + f" | P@r<={RADIUS} |\n"
            "|---|---:|---:|" + "---:|" * (len(TOP_K) + 1) + "\n")
    rows = sorted(((int(b), -m["mAP"], name, m) for name, by_bits in results.items() for b, m in by_bits.items()),
                  key=lambda r: r[:2])
    text = [f"# Retrieval with binary codes: {protocol['dataset']}\n",
            f"Queries: {protocol['queries']} test images (up to {protocol['per_class']} per class, drawn with seed "
            f"{protocol['seed']}); database: the {protocol['database']} training images; relevant: the same label; "
            "ranking by Hamming distance. mAP over the whole database (items at equal distance form one threshold), "
            f"precision of the k nearest ({', '.join(map(str, TOP_K))}; ties as faiss returns them) and within "
            f"Hamming radius {RADIUS} (0 where nothing lies within it). Baselines fitted on the database pixels: "
            "`lsh` (random projections), `pcah` (PCA), `itq` (PCA-ITQ, 50 iterations); discvae runs: "
            f"{', '.join(f'`{r}`' for r in runs)}.\n",
            head + "\n".join(_fmt_row(name, str(b), m) for b, _, name, m in rows) + "\n",
            f"![precision-recall]({PR_FIGURE})\n",
            f"Nearest database images of {GRID_QUERIES} queries for `{best}`, the run with the highest mAP:\n",
            f"![queries]({GRID_FIGURE})\n"]
    return write_text(out / REPORT, "\n".join(text))
