"""Clustering evaluation: the metrics on hand-computed cases, grouping by seed, ``discvae clustering`` end to end."""
import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from discvae import Config
from discvae.applications.clustering import cluster_metrics, cluster_order, seed_groups, summarize
from helpers import assert_one_line_error, run_cli, train_digits


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
    assert list(cluster_order(labels, np.array([2, 2, 2, 0, 0, 1]), 4)) == [2, 0, 1, 3]  # by class, size; empty


def test_seed_groups_and_their_summary():
    configs = {"a": Config(seed=0, out="a"), "b": Config(lr=0.01, out="b"), "c": Config(seed=1, out="c",
                                                                                        device="cpu")}
    assert seed_groups(configs) == [["a", "c"], ["b"]]
    rows = [{"acc_one_to_one": None, "acc_many_to_one": a, "nmi": a, "ari": a} for a in (0.5, 0.7)]
    s = summarize(rows)
    assert s["n"] == 2 and s["acc_one_to_one"] is None
    assert s["nmi"]["mean"] == pytest.approx(0.6) and s["nmi"]["std"] == pytest.approx(0.02 ** 0.5)  # sample std
    assert summarize(rows[:1])["ari"] == {"mean": 0.5, "std": None}


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
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x_train=np.random.default_rng(0).random((60, 8, 8)))
    train_digits(tmp_path / "nolabels", "--dataset", unlabelled, "--latent", "categorical", "--latent-dim", "4")
    for argv, match in (([runs["gauss"]], "gaussian:8 latent; this needs one categorical block"),
                        ([runs["bits"]], "bernoulli:8 latent; this needs one categorical block"),
                        ([runs["groups"]], "2 categorical groups"), ([tmp_path / "none"], "not a run directory"),
                        ([runs["cat-s0"], "--gaussian", runs["cat12"]], "needs one gaussian block"),
                        ([tmp_path / "nolabels"], "labels")):
        code, _, err = run_cli(capsys, "clustering", *argv, "--out", tmp_path / "out")
        assert_one_line_error(code, err, match)
    assert not (tmp_path / "out" / "clustering.json").exists()
