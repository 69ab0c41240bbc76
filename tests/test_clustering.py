"""Clustering evaluation: the metrics on hand-computed cases, grouping by seed, ``discvae clustering`` end to end."""
import json
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics.cluster import contingency_matrix

from discvae import Config, load_dataset, load_run
from discvae.applications import clustering as clustering_module
from discvae.applications.clustering import (
    baseline_features,
    cluster_metrics,
    cluster_order,
    clusters_figure,
    confusion_figure,
    kmeans,
    seed_groups,
    summarize,
    write_report,
)
from discvae.evaluation import fixed_binarization
from discvae.figures import templates
from helpers import assert_one_line_error, drawn, framed, run_cli, train_digits


def test_a_permuted_clustering_is_perfect():
    labels = np.random.default_rng(0).integers(0, 10, 500)
    perm = np.array([3, 7, 0, 9, 1, 4, 8, 2, 6, 5])
    m = cluster_metrics(labels, perm[labels], 10)
    assert m["acc_one_to_one"] == 1 and m["acc_many_to_one"] == 1
    assert m["nmi"] == pytest.approx(1) and m["ari"] == pytest.approx(1) and m["used_clusters"] == 10
    assert np.array_equal(cluster_order(labels, perm[labels], 10), perm)  # cluster matched to class i at i


def test_independent_clusters_score_near_zero():
    rng = np.random.default_rng(1)
    m = cluster_metrics(rng.integers(0, 10, 20000), rng.integers(0, 10, 20000), 10)
    assert m["nmi"] < 0.01 and abs(m["ari"]) < 0.01 and m["acc_one_to_one"] < 0.12


def test_many_to_one_and_one_to_one_accuracy_by_hand():
    labels = np.array([0, 1, 1, 1, 1, 1])
    # two clusters: class 0 -> {c0: 1}, class 1 -> {c0: 2, c1: 3}. One-to-one the best matching is 0-c0, 1-c1: 4/6;
    # many-to-one both clusters take the majority class 1: 2 + 3 = 5 of 6
    m = cluster_metrics(labels, np.array([0, 0, 0, 1, 1, 1]), 2)
    assert m["acc_one_to_one"] == pytest.approx(4 / 6) and m["acc_many_to_one"] == pytest.approx(5 / 6)
    # three clusters (one empty) for two classes: no one-to-one accuracy
    m = cluster_metrics(labels, np.array([0, 0, 0, 1, 1, 1]), 3)
    assert m["acc_one_to_one"] is None and m["acc_many_to_one"] == pytest.approx(5 / 6)
    assert m["clusters"] == 3 and m["used_clusters"] == 2
    assert m["counts"] == [[1, 0, 0], [2, 3, 0]]  # class x cluster, the empty cluster 2 a column of zeros
    assert json.dumps(m["counts"]) == "[[1, 0, 0], [2, 3, 0]]"  # counts, not floats, in clustering.json
    assert list(cluster_order(labels, np.array([2, 2, 2, 0, 0, 1]), 4)) == [2, 0, 1, 3]  # by class, size; empty


def test_clusters_are_ordered_by_their_one_to_one_match_only_when_there_are_as_many_as_classes():
    """Class 0 is the majority of every cluster below. With 2 clusters for 2 classes the matching gives cluster 0 to
    class 0 and cluster 1 to class 1; with 3 clusters (one of them empty, or not) each takes its majority class 0,
    so they are ordered by size."""
    def labelled(table):  # (labels, clusters) with table[class][cluster] items of each pair
        pairs = [(c, k) for c, row in enumerate(table) for k, n in enumerate(row) for _ in range(n)]
        return tuple(np.array(a) for a in zip(*pairs, strict=True))
    two = labelled([[5, 4], [0, 2]])
    assert list(cluster_order(*two, 2)) == [0, 1]
    assert list(cluster_order(*two, 3)) == [1, 0, 2]  # sizes 6, 5; cluster 2 empty
    assert list(cluster_order(*labelled([[5, 4, 1], [0, 2, 0]]), 3)) == [1, 0, 2]


def test_seed_groups_and_their_summary():
    configs = {"a": Config(seed=0, out="a"), "b": Config(lr=0.01, out="b"), "c": Config(seed=1, out="c",
                                                                                        device="cpu")}
    assert seed_groups(configs) == [["a", "c"], ["b"]]
    augment = {"rotation": 10.0, "shift": 1.0, "scale": 0.0, "shear": 0.0, "flip": 0.0}
    reordered = {  # a setting's dict written in another key order (config.json of another version) is the same
        "d": Config(seed=0, augment=augment), "e": Config(seed=1, augment=dict(reversed(list(augment.items()))))}
    assert seed_groups(reordered) == [["d", "e"]]
    rows = [{"acc_one_to_one": None, "acc_many_to_one": a, "nmi": a, "ari": a} for a in (0.5, 0.7)]
    s = summarize(rows)
    assert s["n"] == 2 and s["acc_one_to_one"] is None
    assert s["nmi"]["mean"] == pytest.approx(0.6) and s["nmi"]["std"] == pytest.approx(0.02 ** 0.5)  # sample std
    assert summarize(rows[:1])["ari"] == {"mean": 0.5, "std": None}


def test_kmeans_is_sklearns_seeded_kmeans_with_its_restarts():
    """``kmeans(x, k, seed, n_init)`` is ``KMeans(k, n_init=n_init, random_state=seed)``; by default seed 0 and one
    start. Ten clusters of uniform noise: each seed and number of starts ends in another local optimum."""
    x = np.random.default_rng(0).random((300, 2))
    for seed, n_init in ((0, 1), (3, 1), (3, 4)):
        direct = KMeans(10, n_init=n_init, random_state=seed).fit_predict(x)
        assert np.array_equal(kmeans(x, 10, seed, n_init), direct), (seed, n_init)
    assert np.array_equal(kmeans(x, 10), KMeans(10, n_init=1, random_state=0).fit_predict(x))
    assert len({kmeans(x, 10, seed, n_init).tobytes() for seed, n_init in ((0, 1), (3, 1), (3, 4))}) == 3


def test_baseline_features_are_the_pixels_their_seeded_pca_and_the_gaussian_means():
    """600 items of 100 values: scikit-learn's PCA takes its randomised solver, so the seed matters."""
    pixels = np.random.default_rng(0).random((600, 100)).astype(np.float32)
    features = baseline_features(pixels, seed=5)
    assert list(features) == ["pixels", "pca50"] and features["pixels"] is pixels
    assert np.array_equal(features["pca50"], PCA(50, random_state=5).fit_transform(pixels))
    assert not np.array_equal(features["pca50"], PCA(50, random_state=6).fit_transform(pixels))
    means = np.ones((600, 3))
    assert baseline_features(pixels, 5, means)["gaussvae"] is means
    assert baseline_features(pixels[:, :20], 5)["pca20"].shape == (600, 20)  # fewer values than PCA_DIMS


def test_the_confusion_figure_shows_the_counts_of_the_non_empty_clusters_in_order(monkeypatch):
    labels = np.array([3, 3, 3, 3, 1, 1, 1, 7, 7, 7, 7, 7, 7, 7])
    clusters = np.array([4, 4, 4, 0, 0, 0, 2, 2, 2, 2, 2, 2, 4, 2])
    order = np.array([4, 0, 2, 1, 3])  # clusters 1 and 3 are empty
    metrics = {"acc_one_to_one": 0.8125, "acc_many_to_one": 0.9, "nmi": 0.5, "ari": 0.25}
    fig = drawn(monkeypatch, lambda: confusion_figure("x.png", labels, clusters, order, "cat-s0", metrics))
    ax, colorbar = fig.axes
    shown = contingency_matrix(labels, clusters)[:, [2, 0, 1]]  # the columns of clusters 4, 0, 2
    assert shown.tolist() == [[0, 2, 1], [3, 1, 0], [1, 0, 6]]
    assert np.array_equal(ax.images[0].get_array(), shown)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "0", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "3", "7"]
    numbers = {(t.get_position(), t.get_text()): to_rgba(t.get_color()) for t in ax.texts}
    white, black = to_rgba("white"), to_rgba("black")  # white on the cells above half the largest count (3 is not)
    assert numbers == {((1, 0), "2"): black, ((2, 0), "1"): black, ((0, 1), "3"): black, ((1, 1), "1"): black,
                       ((0, 2), "1"): black, ((2, 2), "6"): white}
    assert colorbar.get_ylabel() == "images"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("cluster (ordered by assigned class)", "class")
    assert ax.get_title() == "cat-s0: accuracy 0.812 (one-to-one), NMI 0.500, ARI 0.250"
    many = {**metrics, "acc_one_to_one": None}
    fig = drawn(monkeypatch, lambda: confusion_figure("x.png", labels, clusters, order, "cat12", many))
    assert fig.axes[0].get_title() == "cat12: accuracy 0.900 (many-to-one), NMI 0.500, ARI 0.250"


@pytest.mark.parametrize("n", [30, 31])
def test_the_confusion_figure_numbers_at_most_30_clusters(monkeypatch, n):
    clusters = np.arange(2 * n) % n
    labels = clusters % 2
    metrics = {"acc_one_to_one": None, "acc_many_to_one": 1.0, "nmi": 1.0, "ari": 1.0}
    fig = drawn(monkeypatch, lambda: confusion_figure("x.png", labels, clusters, np.arange(n), "c", metrics))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ([] if n > 30 else ["2"] * n)
    assert [t.get_text() for t in ax.get_xticklabels()] == ([] if n > 30 else [str(c) for c in range(n)])


def test_the_clusters_figure_shows_each_template_then_its_most_typical_members(runs, monkeypatch):
    """A row per cluster in ``order``: the decoded one-hot state, then the members of highest q(z = k|x), ties in
    index order; an empty cluster shows its template alone."""
    model = load_run(runs["cat-s0"])[1]
    rng = np.random.default_rng(0)
    x = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    clusters = np.where(np.arange(300) < 250, 6, 2)
    probs = np.round(rng.random((300, 10)), 1)  # many ties among the 250 members of cluster 6
    captured = framed(monkeypatch, clustering_module,
                      lambda: clusters_figure("x.png", model, x, clusters, probs, np.array([6, 2, 9]), members=4))
    members = [sorted(np.flatnonzero(clusters == k), key=lambda i: (-probs[i, k], i))[:4] for k in (6, 2)]
    assert probs[members[0], 6].tolist() == [1.0] * 4
    decoded = templates(model, (1, 8, 8))
    expected = [torch.cat([decoded[6:7], x[members[0]]]), torch.cat([decoded[2:3], x[members[1]]]), decoded[9:10]]
    assert len(captured["rows"]) == 3
    for row, want in zip(captured["rows"], expected, strict=True):
        assert torch.equal(row, want)
    assert [(i, j, to_rgba(c)) for i, j, c in captured["frames"]] == [(i, 0, to_rgba("tab:blue")) for i in range(3)]
    assert captured["title"] == "cluster template (decoded e_k) | its 4 most typical members"


def test_the_report_has_a_row_per_seed_group_and_baseline(tmp_path):
    def metrics(acc, nmi, clusters=10, used=10):
        return {"clusters": clusters, "used_clusters": used, "acc_one_to_one": acc, "acc_many_to_one": 0.9,
                "nmi": nmi, "ari": 0.5}
    results = {"cat-s0": metrics(0.8, 0.7), "cat-s1": metrics(0.6, 0.75, used=9), "cat12": metrics(None, 0.72, 12)}
    groups = [{"runs": ["cat-s0", "cat-s1"], **summarize([results["cat-s0"], results["cat-s1"]])},
              {"runs": ["cat12"], **summarize([results["cat12"]])}]
    baselines = {"kmeans_pixels_k10": metrics(0.55, 0.5)}
    path = write_report(tmp_path, "digits", 1797, groups, results, baselines, "cat-s1")
    assert path == tmp_path / "report.md"
    assert path.read_text() == """# Clustering with a categorical latent: digits

All 1797 training and test images; a run's cluster is argmax_k q(z = k|x). Accuracy one-to-one: best one-to-one \
matching of clusters to classes (Hungarian algorithm; only when there are as many clusters as classes); \
many-to-one: each cluster takes its majority label. Runs that differ only by seed are one row: mean ± sample \
standard deviation. Baselines: k-means (k-means++, seeded) on the pixels, on their principal components and on a \
Gaussian VAE's posterior means.

| method | runs | clusters (used) | acc one-to-one | acc many-to-one | NMI | ARI |
|---|---:|---:|---:|---:|---:|---:|
| cat-s0, cat-s1 | 2 | 10 (10/9) | 0.7000 ± 0.1414 | 0.9000 ± 0.0000 | 0.7250 ± 0.0354 | 0.5000 ± 0.0000 |
| cat12 | 1 | 12 (10) | - | 0.9000 | 0.7200 | 0.5000 |
| kmeans_pixels_k10 | - | 10 (10) | 0.5500 | 0.9000 | 0.5000 | 0.5000 |

Class x cluster counts of `cat-s1` (the run with the highest NMI), clusters ordered by their matched class:

![confusion](confusion.png)

Its clusters: the decoded template and the most typical members:

![clusters](clusters.png)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clustering")
    cat = ("--latent", "categorical", "--latent-dim", "10")
    return {"cat-s0": train_digits(root / "cat-s0", *cat), "cat-s1": train_digits(root / "cat-s1", *cat, "--seed", 1),
            "cat12": train_digits(root / "cat12", "--latent", "categorical", "--latent-dim", "12"),
            "gauss": train_digits(root / "gauss", "--latent", "gaussian", "--estimator", "reparam"),
            "bits": train_digits(root / "bits"),
            "groups": train_digits(root / "groups", *cat, "--groups", "2")}


def test_clustering_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run_cli(capsys, "clustering", runs["cat-s0"], runs["cat-s1"], runs["cat12"], "--gaussian",
                              runs["gauss"], "--out", out, "--n-init", "2")
    assert code == 0 and stdout.strip() == str(out / "report.md")
    result = json.loads((out / "clustering.json").read_text())
    assert result["images"] == 1797 and result["classes"] == 10 and result["n_init"] == 2
    assert [g["runs"] for g in result["groups"]] == [["cat-s0", "cat-s1"], ["cat12"]]
    s0, s1 = result["runs"]["cat-s0"], result["runs"]["cat-s1"]
    assert result["groups"][0]["nmi"]["mean"] == pytest.approx((s0["nmi"] + s1["nmi"]) / 2)
    assert result["runs"]["cat12"]["acc_one_to_one"] is None and s0["acc_one_to_one"] <= s0["acc_many_to_one"]
    assert sorted(result["baselines"]) == sorted(f"kmeans_{f}_k{k}" for f in ("pixels", "pca50", "gaussvae")
                                                 for k in (10, 12))
    assert result["baselines"]["kmeans_pixels_k10"]["acc_one_to_one"] > 0.5  # k-means does well on the digits
    assert result["baselines"]["kmeans_pixels_k12"]["acc_one_to_one"] is None
    report = (out / "report.md").read_text()
    assert "cat-s0, cat-s1 | 2 |" in report and "kmeans_gaussvae_k12" in report
    assert mpimg.imread(out / "confusion.png").ndim == 3
    best = max(("cat-s0", "cat-s1", "cat12"), key=lambda n: result["runs"][n]["nmi"])
    rows = 12 if best == "cat12" else 10  # one row of 8x8 images per cluster, 2-pixel gaps, 7x, title strip
    assert mpimg.imread(out / "clusters.png").shape[0] == (rows * 10 + 2) * 7 + 30
    assert not list(out.glob(".*.tmp"))


def test_clustering_rejects_bad_input(runs, tmp_path, capsys):
    """Each refusal in full (what follows "error: "), and no result written."""
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x_train=np.random.default_rng(0).random((60, 8, 8)))
    nolabels = train_digits(tmp_path / "nolabels", "--dataset", unlabelled, "--latent", "categorical", "--latent-dim",
                            "4")
    elsewhere = train_digits(tmp_path / "elsewhere", "--dataset", unlabelled, "--latent", "gaussian", "--estimator",
                             "reparam")
    cat, gauss, bits, groups = (runs[name] for name in ("cat-s0", "gauss", "bits", "groups"))
    one_block = "latent; this needs one categorical block (beside Gaussian ones at most)"
    for argv, message in (
            ([gauss], f"{gauss} has a gaussian:8 {one_block}"), ([bits], f"{bits} has a bernoulli:8 {one_block}"),
            ([groups], "groups has 2 categorical groups; clustering needs one"),
            ([tmp_path / "none"], f"{tmp_path / 'none'} is not a run directory (no config.json)"),
            ([cat, "--gaussian", runs["cat12"]], f"{runs['cat12']} has a categorical:12 latent; this needs one "
                                                 "gaussian block (beside Gaussian ones at most)"),
            ([cat, "--gaussian", elsewhere], f"the runs must share one dataset, got {unlabelled}, digits"),
            ([nolabels], f"clustering needs class labels, and dataset {str(unlabelled)!r} has none for its all split"),
            ([cat, "--n-init", "0"], "--n-init and --batch-size must be at least 1"),
            ([cat, "--batch-size", "0"], "--n-init and --batch-size must be at least 1"),
            ([cat, "--seed", str(2 ** 32)], f"--seed must be between 0 and 2^32 - 1 = {2 ** 32 - 1}, got {2 ** 32}")):
        code, _, err = run_cli(capsys, "clustering", *argv, "--out", tmp_path / "out")
        assert_one_line_error(code, err, message)
        assert err.strip() == f"discvae clustering: error: {message}"
    assert not (tmp_path / "out" / "clustering.json").exists()


def test_clustering_reports_seeded_baselines_and_draws_the_run_of_highest_nmi(runs, tmp_path, monkeypatch):
    """``clustering`` from Python, without a Gaussian run: the baselines are ``kmeans`` with the seed and restarts
    given, and the figures show the clusters, order and typical members of the run of highest NMI."""
    drawn = {}
    monkeypatch.setattr(clustering_module, "confusion_figure", lambda path, labels, clusters, order, name, metrics:
                        drawn.update(confusion=(clusters, order, name, metrics)))
    monkeypatch.setattr(clustering_module, "clusters_figure", lambda path, model, x, clusters, probs, order:
                        drawn.update(clusters=(clusters, probs, order)))
    shutil.copytree(runs["cat12"], tmp_path / "a-cat12")  # the highest NMI of the three, under the first name
    dirs = {"cat-s0": runs["cat-s0"], "cat-s1": runs["cat-s1"], "a-cat12": tmp_path / "a-cat12"}
    names = list(dirs)
    out = tmp_path / "out"
    assert clustering_module.clustering(list(dirs.values()), out, seed=3, n_init=2) == out / "report.md"
    result = json.loads((out / "clustering.json").read_text())
    assert (result["dataset"], result["images"], result["classes"]) == ("digits", 1797, 10)
    report = (out / "report.md").read_text()
    assert report.startswith("# Clustering with a categorical latent: digits\n\nAll 1797 training and test images;")
    assert (result["seed"], result["n_init"], result["gaussian"]) == (3, 2, None)
    data = load_dataset("digits")
    x, labels = torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test]).numpy()
    pixels = x.flatten(1).numpy()
    pca = PCA(50, random_state=3).fit_transform(pixels)
    for name, features, k in (("kmeans_pixels_k10", pixels, 10), ("kmeans_pixels_k12", pixels, 12),
                              ("kmeans_pca50_k12", pca, 12)):  # at k = 12 the second restart finds a better one
        assert result["baselines"][name] == cluster_metrics(labels, kmeans(features, k, 3, 2), k), name
    best = max(names, key=lambda n: result["runs"][n]["nmi"])
    assert best != max(names)  # the run of highest NMI, not the last name
    clusters, order, name, metrics = drawn["confusion"]
    assert (name, metrics) == (best, result["runs"][best])
    assert f"Class x cluster counts of `{best}` (the run with the highest NMI)" in report
    cfg, model, _ = load_run(dirs[best])
    inputs = fixed_binarization(x, cfg.binarize)
    codes = model.codes(inputs).numpy()[:, 0]
    assert np.array_equal(clusters, codes)
    assert np.array_equal(order, cluster_order(labels, codes, metrics["clusters"]))
    assert np.array_equal(drawn["clusters"][0], codes) and np.array_equal(drawn["clusters"][2], order)
    assert np.allclose(drawn["clusters"][1], model.encode(inputs).numpy()[:, 0])
    clustering_module.clustering([runs["cat-s0"]], tmp_path / "defaults", batch_size=1)  # one image a call
    defaults = json.loads((tmp_path / "defaults" / "clustering.json").read_text())
    assert (defaults["seed"], defaults["n_init"]) == (0, 1)
