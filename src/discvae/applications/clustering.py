"""``discvae clustering``: the class of a one-group categorical latent as a clustering of the images, against k-means.

The cluster of an image is argmax_k q(z = k|x) (``VAE.codes``); every training and test image is clustered (70,000
for MNIST) and compared with its label:

* ``acc_one_to_one``: the accuracy under the best one-to-one matching of clusters to classes (the Hungarian
  algorithm, ``scipy.optimize.linear_sum_assignment``, on the class x cluster contingency table), reported when
  the number of clusters equals the number of classes;
* ``acc_many_to_one``: the accuracy when each cluster takes its majority label (always reported; it is at least the
  one-to-one accuracy, and grows with the number of clusters);
* ``nmi``, ``ari``: sklearn's normalised mutual information and adjusted Rand index;
* ``counts``: the class x cluster table of image counts (classes in sorted order, clusters 0..c-1, empty ones
  included), which shows what a clustering merges and splits.

Runs whose configurations differ only by ``seed`` (and ``SEED_FREE``'s settings, which do not change the model) form
a group, summarised by the mean and the sample standard deviation of each metric over its runs.

Baselines on the same images: sklearn's ``KMeans`` (k-means++, ``n_init`` restarts, the one of least inertia kept,
seeded) with k = the number of classes and k = each run's number of categories c, on the pixels
(``kmeans_pixels_kK``), on their top 50 principal components (``kmeans_pca50_kK``) and, given a Gaussian VAE run, on
its posterior means (``kmeans_gaussvae_kK``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from ..config import SKLEARN_MAX_SEED, check_seed
from ..distributions import Categorical, Gaussian
from ..errors import InputError
from ..evaluation import fixed_binarization
from ..runs import write_json, write_text
from .codes import code_block, framed_grid, labels_of, load_coded_run, load_coded_runs, one_dataset, split_images

SEED_FREE = ("seed", "out", "data_dir", "download", "device", "grad_var_every", "grad_var_repeats")
METRICS = ("acc_one_to_one", "acc_many_to_one", "nmi", "ari")
PCA_DIMS, MEMBERS = 50, 10
RESULTS, REPORT, CONFUSION, CLUSTERS = "clustering.json", "report.md", "confusion.png", "clusters.png"


def matching(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching of rows (classes) to columns (clusters) of a contingency ``table`` that maximises
    the matched count: (rows, columns), by ``linear_sum_assignment``."""
    return linear_sum_assignment(table, maximize=True)


def cluster_metrics(labels: np.ndarray, clusters: np.ndarray, n_clusters: int) -> dict:
    """The metrics of the module docstring for cluster indices ``clusters`` (out of ``n_clusters``) against
    ``labels``; ``acc_one_to_one`` is None unless ``n_clusters`` equals the number of classes."""
    table = contingency_matrix(labels, clusters)
    counts = np.zeros((table.shape[0], n_clusters), dtype=np.int64)
    counts[:, np.unique(clusters)] = table
    one_to_one = None
    if n_clusters == len(np.unique(labels)):
        one_to_one = float(table[matching(table)].sum() / len(labels))
    return {"clusters": n_clusters, "used_clusters": int(table.shape[1]), "acc_one_to_one": one_to_one,
            "acc_many_to_one": float(table.max(0).sum() / len(labels)),
            "nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)), "counts": counts.tolist()}


def cluster_order(labels: np.ndarray, clusters: np.ndarray, n_clusters: int) -> np.ndarray:
    """The cluster indices 0..n_clusters-1 ordered by the class each is assigned -- its one-to-one match when
    ``n_clusters`` equals the number of classes, else (and for the unmatched) its majority class -- then by size;
    empty clusters last."""
    present = np.unique(clusters)
    table = contingency_matrix(labels, clusters)
    assigned = table.argmax(0)
    if n_clusters == table.shape[0]:
        rows, cols = matching(table)
        assigned[cols] = rows
    ordered = present[np.lexsort((-table.sum(0), assigned))]
    return np.concatenate([ordered, np.setdiff1d(np.arange(n_clusters), present)])


def summarize(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (None for one row) of each metric over ``rows`` (None stays None)."""
    out = {"n": len(rows)}
    for key in METRICS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = None if not values else {
            "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    return out


def seed_groups(configs: dict) -> list[list[str]]:
    """Names of ``configs`` (name -> ``Config``) grouped by their configuration without the ``SEED_FREE`` keys,
    in order of first appearance."""
    groups = {}
    for name, cfg in configs.items():
        key = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in SEED_FREE}, sort_keys=True)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def kmeans(features: np.ndarray, k: int, seed: int = 0, n_init: int = 1) -> np.ndarray:
    """Cluster indices of sklearn ``KMeans`` (k-means++, ``n_init`` restarts, ``random_state=seed``)."""
    return KMeans(k, n_init=n_init, random_state=seed).fit_predict(features)


def baseline_features(pixels: np.ndarray, seed: int, gaussian_means: np.ndarray | None = None) -> dict:
    """Feature sets of the k-means baselines: the pixels, their top ``PCA_DIMS`` principal components (fewer for
    small images) and a Gaussian VAE's posterior means, by name."""
    dims = min(PCA_DIMS, *pixels.shape)
    features = {"pixels": pixels, f"pca{dims}": PCA(dims, random_state=seed).fit_transform(pixels)}
    return features if gaussian_means is None else {**features, "gaussvae": gaussian_means}


def clustering(run_dirs: list, out, gaussian: str | None = None, seed: int = 0, n_init: int = 1,
               batch_size: int = 1024) -> Path:
    """Evaluate the clusterings (argmax_k q(z = k|x)) of one-group categorical runs and the k-means baselines on
    all images.

    Args:
        run_dirs: trained runs with one categorical group, on one dataset.
        out: the folder for ``clustering.json``, ``confusion.png`` and ``clusters.png`` (the run with the highest
            NMI) and ``report.md``.
        gaussian: a Gaussian VAE run: k-means on its posterior means too.
        seed: seeds k-means and PCA.
        n_init: k-means restarts, the best kept.
        batch_size: images per encoder call.

    Returns:
        The path of ``report.md``.
    """
    if n_init < 1 or batch_size < 1:
        raise InputError("n_init and batch_size must be at least 1", "n_init", "batch_size")
    check_seed(seed, SKLEARN_MAX_SEED)
    out = Path(out)
    runs = load_coded_runs(run_dirs, Categorical)
    classes = {name: code_block(model).size for name, (_, model, _) in runs.items()}
    for name, (_, model, _) in runs.items():
        if code_block(model).groups != 1:
            raise InputError(f"{name} has {code_block(model).groups} categorical groups; clustering needs one")
    gauss = load_coded_run(gaussian, Gaussian) if gaussian else None
    one_dataset(cfg for cfg, _, _ in [*runs.values(), *([gauss] if gauss else [])])
    names, data = list(runs), next(iter(runs.values()))[2]
    labels = labels_of(data, "all", "clustering")
    x = split_images(data, "all")[0]
    clusters, results = {}, {}
    for name, (cfg, model, _) in runs.items():
        clusters[name] = model.codes(fixed_binarization(x, cfg.binarize), batch_size).numpy()[:, 0]
        results[name] = cluster_metrics(labels, clusters[name], classes[name])
    means = None if gauss is None else gauss[1].encode(fixed_binarization(x, gauss[0].binarize), batch_size).numpy()
    ks = sorted({len(np.unique(labels)), *classes.values()})
    baselines = {f"kmeans_{feature}_k{k}": cluster_metrics(labels, kmeans(values, k, seed, n_init), k)
                 for feature, values in baseline_features(x.flatten(1).numpy(), seed, means).items() for k in ks}
    groups = [{"runs": group, **summarize([results[n] for n in group])}
              for group in seed_groups({n: cfg for n, (cfg, _, _) in runs.items()})]
    write_json(out / RESULTS, {"dataset": data.name, "images": len(x), "classes": len(np.unique(labels)),
                               "seed": seed, "n_init": n_init, "gaussian": gaussian, "runs": results,
                               "groups": groups, "baselines": baselines})
    best = max(names, key=lambda n: results[n]["nmi"])
    cfg, model, _ = runs[best]
    order = cluster_order(labels, clusters[best], classes[best])
    confusion_figure(out / CONFUSION, labels, clusters[best], order, best, results[best])
    probs = model.encode(fixed_binarization(x, cfg.binarize), batch_size).numpy()[:, 0]
    clusters_figure(out / CLUSTERS, model, x, clusters[best], probs, order)
    return write_report(out, data.name, len(x), groups, results, baselines, best)


def confusion_figure(path, labels: np.ndarray, clusters: np.ndarray, order: np.ndarray, name: str,
                     metrics: dict) -> None:
    """The class x cluster counts, clusters in ``order`` (non-empty ones only), as a heat map."""
    from ..figures import save_figure, subplots

    classes = np.unique(labels)
    shown = order[np.isin(order, clusters)]
    table = contingency_matrix(labels, clusters)[:, np.searchsorted(np.unique(clusters), shown)]
    fig, ax = subplots(figsize=(min(16, 2 + 0.45 * len(shown)), 1.5 + 0.4 * len(classes)), dpi=90)
    image = ax.imshow(table, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, label="images")
    if len(shown) <= 30:
        ax.set_xticks(range(len(shown)), [str(c) for c in shown])
        for (i, j), count in np.ndenumerate(table):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=6,
                        color="white" if count > table.max() / 2 else "black")
    else:  # too many to number: no ticks (matplotlib's would number positions, not clusters)
        ax.set_xticks([])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    acc = metrics["acc_one_to_one"] if metrics["acc_one_to_one"] is not None else metrics["acc_many_to_one"]
    kind = "one-to-one" if metrics["acc_one_to_one"] is not None else "many-to-one"
    ax.set(xlabel="cluster (ordered by assigned class)", ylabel="class",
           title=f"{name}: accuracy {acc:.3f} ({kind}), NMI {metrics['nmi']:.3f}, ARI {metrics['ari']:.3f}")
    fig.tight_layout()
    save_figure(path, fig)


def clusters_figure(path, model, x: torch.Tensor, clusters: np.ndarray, probs: np.ndarray, order: np.ndarray,
                    members: int = MEMBERS) -> None:
    """One row per cluster k in ``order``: its template (the one-hot state e_k decoded, framed) and its ``members``
    most typical members, the images assigned to k with the highest q(z = k|x) (``probs`` ``[N, c]``)."""
    from ..figures import templates

    decoded = templates(model, x.shape[1:])
    rows = []
    for k in order:
        mine = np.flatnonzero(clusters == k)
        typical = mine[np.argsort(-probs[mine, k], kind="stable")[:members]]
        rows.append(torch.cat([decoded[k:k + 1], x[torch.from_numpy(typical)]]))
    framed_grid(path, rows, [(i, 0, "tab:blue") for i in range(len(rows))],
                f"cluster template (decoded e_k) | its {members} most typical members")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['mean']:.4f}" + ("" if value["std"] is None else f" ± {value['std']:.4f}")
    return f"{value:.4f}"


def write_report(out: Path, dataset: str, n_images: int, groups: list[dict], results: dict, baselines: dict,
                 best: str) -> Path:
    """``out/report.md``: the metrics of every run group (mean ± sample std over seeds) and baseline, and the
    figures."""
    head = ("| method | runs | clusters (used) | acc one-to-one | acc many-to-one | NMI | ARI |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    rows = [f"| {', '.join(g['runs'])} | {g['n']} | {results[g['runs'][0]]['clusters']} "
            f"({'/'.join(str(results[n]['used_clusters']) for n in g['runs'])}) | "
            + " | ".join(_cell(g[m]) for m in METRICS) + " |" for g in groups]
    rows += [f"| {name} | - | {m['clusters']} ({m['used_clusters']}) | " + " | ".join(_cell(m[k]) for k in METRICS)
             + " |" for name, m in baselines.items()]
    text = [f"# Clustering with a categorical latent: {dataset}\n",
            f"All {n_images} training and test images; a run's cluster is argmax_k q(z = k|x). Accuracy one-to-one: "
            "best one-to-one matching of clusters to classes (Hungarian algorithm; only when there are as many "
            "clusters as classes); many-to-one: each cluster takes its majority label. Runs that differ only by "
            "seed are one row: mean ± sample standard deviation. Baselines: k-means (k-means++, seeded) on the "
            "pixels, on their principal components and on a Gaussian VAE's posterior means.\n",
            head + "\n".join(rows) + "\n",
            f"Class x cluster counts of `{best}` (the run with the highest NMI), clusters ordered by their matched "
            f"class:\n\n![confusion]({CONFUSION})\n",
            f"Its clusters: the decoded template and the most typical members:\n\n![clusters]({CLUSTERS})\n"]
    return write_text(out / REPORT, "\n".join(text))
