"""Hashing evaluation: the metrics on hand-computed cases, Hamming distances three ways, the baselines and
``discvae retrieval`` end to end."""
import json
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
from sklearn.base import clone

from discvae.applications.retrieval import (
    ITQ,
    LSH,
    PCAH,
    evaluate_codes,
    hamming,
    hamming_knn,
    pack,
    select_queries,
)
from helpers import assert_one_line_error, run_cli, train_digits

# a 3-bit query 000 of class 1 against five items: distances 0, 1, 1, 1, 3; classes 0, 1, 1, 0, 1
QUERY = np.array([[0, 0, 0]], np.uint8)
DATABASE = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.uint8)
DB_LABELS = np.array([0, 1, 1, 0, 1])


def test_metrics_by_hand_with_tied_distances():
    m = evaluate_codes(QUERY, np.array([1]), DATABASE, DB_LABELS, top_k=(1, 4, 5, 10))
    # thresholds d <= 0: 0 of 1 relevant; d <= 1: 2 of 4 (recall 2/3); d <= 3: 3 of 5 (recall 1)
    # AP = sum (R_r - R_{r-1}) P_r = 2/3 * 1/2 + 1/3 * 3/5 = 8/15: the ties at d = 1 form one threshold. Ranked
    # one by one in index order they would give (1/2 + 2/3 + 3/5) / 3 = 53/90 instead.
    assert m["mAP"] == pytest.approx(8 / 15)
    assert m["P@1"] == 0 and m["P@5"] == pytest.approx(3 / 5) and m["P@10"] == pytest.approx(3 / 5)  # k clipped
    assert m["P@4"] == pytest.approx(2 / 4)  # the four items within distance 1, whatever their order
    assert m["P@r<=2"] == pytest.approx(2 / 4)
    assert m["pr"]["radius"] == [0, 1, 2, 3]
    assert m["pr"]["precision"] == pytest.approx([0, 1 / 2, 1 / 2, 3 / 5])
    assert m["pr"]["recall"] == pytest.approx([0, 2 / 3, 2 / 3, 1])


def test_precision_within_radius_is_zero_when_nothing_is_inside():
    queries = np.array([[1, 1, 1], [0, 0, 0]], np.uint8)  # the first has no item within 2 of the database [000]
    m = evaluate_codes(queries, np.array([1, 1]), np.zeros((1, 3), np.uint8), np.array([1]), top_k=(1,))
    assert m["P@r<=2"] == 0.5  # mean of 0 (nothing inside) and 1
    assert m["mAP"] == 1.0 and m["P@1"] == 1.0


@pytest.mark.parametrize("n_bits", [3, 8, 50, 64, 100])
def test_packed_unpacked_and_faiss_hamming_distances_agree(n_bits):
    rng = np.random.default_rng(n_bits)
    q, db = rng.integers(0, 2, (7, n_bits), dtype=np.uint8), rng.integers(0, 2, (300, n_bits), dtype=np.uint8)
    direct = (q[:, None, :] != db[None]).sum(-1)
    packed_q, packed_db = pack(q), pack(db)
    assert packed_q.shape == (7, 8 * -(-n_bits // 64))
    assert np.array_equal(hamming(packed_q, packed_db), direct)
    dist, idx = hamming_knn(packed_q, packed_db, 20)
    assert np.array_equal(dist, np.sort(direct, 1)[:, :20])
    assert np.array_equal(np.take_along_axis(direct, idx, 1), dist)


def test_select_queries_draws_per_class_by_seed():
    labels = np.repeat([0, 1, 2], [5, 200, 150])
    chosen = select_queries(labels, 100, seed=3)
    assert np.array_equal(np.bincount(labels[chosen]), [5, 100, 100]) and len(set(chosen)) == 205
    assert np.array_equal(chosen, select_queries(labels, 100, seed=3))
    assert not np.array_equal(chosen, select_queries(labels, 100, seed=4))


def blobs(n=600, dim=20, seed=0):
    """Points around 4 random centres in ``dim`` dimensions, with their centre as label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    return rng.normal(size=(4, dim))[labels] * 3 + rng.normal(size=(n, dim)), labels


def test_itq_quantisation_loss_never_increases():
    x, _ = blobs()
    itq = ITQ(8, seed=1, n_iter=30).fit(x)
    loss = np.array(itq.loss_)
    assert len(loss) == 30 and loss[-1] < loss[0]
    assert np.all(np.diff(loss) <= 1e-9 * loss[0])
    rotation = np.linalg.lstsq(PCAH(8).fit(x).projection_, itq.projection_, rcond=None)[0]
    assert np.allclose(rotation.T @ rotation, np.eye(8), atol=1e-4)  # ITQ = PCA directions times a rotation


@pytest.mark.parametrize("method", [LSH, PCAH, ITQ])
def test_baselines_give_seeded_binary_codes_that_hash_neighbours(method):
    x, labels = blobs()
    codes = method(4, seed=2).fit(x).transform(x)
    assert codes.shape == (600, 4) and codes.dtype == np.uint8 and set(np.unique(codes)) == {0, 1}
    assert np.array_equal(codes, clone(method(4, seed=2)).fit_transform(x))
    m = evaluate_codes(codes[:40], labels[:40], codes[40:], labels[40:], top_k=(10,))
    assert m["mAP"] > 0.5 and m["P@10"] > 0.75  # well separated blobs: 4 classes, chance 0.25


def test_itq_rotation_beats_plain_pca_directions():
    """With more bits than informative directions PCAH spends bits on noise; ITQ's rotation spreads the variance."""
    x, labels = blobs()
    maps = {method: evaluate_codes(codes[:40], labels[:40], codes[40:], labels[40:], top_k=(10,))["mAP"]
            for method in (PCAH, ITQ) for codes in [method(16).fit_transform(x)]}
    assert maps[ITQ] > maps[PCAH] + 0.3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return {"bits": train_digits(root / "bits"), "bits12": train_digits(root / "bits12", "--latent-dim", "12"),
            "cat": train_digits(root / "cat", "--latent", "categorical", "--latent-dim", "10")}


def test_retrieval_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run_cli(capsys, "retrieval", runs["bits"], runs["bits12"], "--out", out, "--per-class", "20")
    assert code == 0 and stdout.strip() == str(out / "report.md")
    result = json.loads((out / "retrieval.json").read_text())
    assert result["protocol"]["queries"] == 200 and result["protocol"]["database"] == 1500
    assert result["runs"] == ["bits", "bits12"]
    assert {name: sorted(by_bits) for name, by_bits in result["results"].items()} == {
        "bits": ["8"], "bits12": ["12"], "lsh": ["12", "8"], "pcah": ["12", "8"], "itq": ["12", "8"]}
    for by_bits in result["results"].values():
        for n_bits, m in by_bits.items():
            assert all(0 <= m[k] <= 1 for k in ("mAP", "P@500", "P@1000", "P@r<=2"))
            assert len(m["pr"]["precision"]) == int(n_bits) + 1 and m["pr"]["recall"][-1] == pytest.approx(1)
    assert result["results"]["itq"]["8"]["mAP"] > 0.15  # above chance (about 0.1 for ten classes)
    report = (out / "report.md").read_text()
    assert "| itq | 8 |" in report and "pr_curves.png" in report and "query_grid.png" in report
    assert mpimg.imread(out / "pr_curves.png").shape[1] > mpimg.imread(out / "pr_curves.png").shape[0]  # 2 panels
    assert mpimg.imread(out / "query_grid.png").ndim == 3
    assert not list(out.glob(".*.tmp"))


def test_the_best_epochs_of_several_runs_are_labelled_by_their_runs(runs, tmp_path, capsys):
    for name in ("seed0", "seed1"):  # as --keep-best keeps them: RUN/best, a run inside the run
        shutil.copytree(runs["bits"], tmp_path / name / "best")
    code, _, _ = run_cli(capsys, "retrieval", tmp_path / "seed0" / "best", tmp_path / "seed1" / "best", "--out",
                         tmp_path / "out", "--per-class", "5")
    result = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert code == 0 and result["runs"] == ["seed0/best", "seed1/best"]
    assert result["results"]["seed0/best"]["8"]["mAP"] == result["results"]["seed1/best"]["8"]["mAP"]  # same weights


def test_retrieval_rejects_bad_input(runs, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x_train=np.random.default_rng(0).random((60, 8, 8)))
    train_digits(tmp_path / "nolabels", "--dataset", unlabelled)
    for argv, match in (([runs["cat"]], "latent; this needs one bernoulli block"),
                        ([tmp_path / "none"], "not a run directory"),
                        ([tmp_path / "nolabels"], "labels"), ([runs["bits"], runs["bits"]], "distinct names")):
        code, _, err = run_cli(capsys, "retrieval", *argv, "--out", tmp_path / "out")
        assert_one_line_error(code, err, match)
    assert not (tmp_path / "out" / "retrieval.json").exists()


def hashed_classes(n: int, rng, prototypes: np.ndarray, weights, flips) -> tuple[np.ndarray, np.ndarray]:
    """``n`` codes: a class drawn with probabilities ``weights``, its prototype with each bit flipped with a
    probability drawn per code from ``flips`` (so the codes range from clean to nearly random)."""
    labels = rng.choice(len(prototypes), n, p=weights)
    noise = rng.random((n, prototypes.shape[1])) < rng.uniform(*flips, (n, 1))
    return (prototypes[labels] ^ noise).astype(np.uint8), labels


def test_metrics_over_many_queries_in_many_blocks_match_a_direct_computation(monkeypatch):
    """evaluate_codes with blocks of 7 queries (18 blocks, the last partial, as MNIST's 60000-item database takes
    15) against a per-query computation written here: AP over the distinct distances as thresholds, P@r<=2 and the
    precision-recall curve from counts within each radius, and P@k between the fewest and most relevant items any
    order of the items tied at the k-th distance can give."""
    from discvae.applications import retrieval

    rng = np.random.default_rng(5)
    prototypes = rng.integers(0, 2, (5, 16), dtype=np.uint8)
    weights = [0.4, 0.25, 0.2, 0.1, 0.05]  # from 5 % to 40 % of the database relevant
    db, db_labels = hashed_classes(600, rng, prototypes, weights, (0.0, 0.45))
    queries, q_labels = hashed_classes(120, rng, prototypes, weights, (0.0, 0.45))
    monkeypatch.setattr(retrieval, "BLOCK_ITEMS", 7 * len(db))
    top_k = (1, 10, 50, 200)
    m = evaluate_codes(queries, q_labels, db, db_labels, top_k=top_k)

    dist = (queries[:, None, :] != db[None]).sum(-1)  # [Q, N]
    relevant = q_labels[:, None] == db_labels[None]
    aps, low, high = [], {k: 0 for k in top_k}, {k: 0 for k in top_k}
    found = np.stack([(dist <= r).sum(1) for r in range(17)], 1)  # [Q, 17]
    hits = np.stack([((dist <= r) & relevant).sum(1) for r in range(17)], 1)
    for d, rel, f, h in zip(dist, relevant, found, hits, strict=True):
        ap, previous = 0.0, 0
        for r in np.unique(d):
            ap += (h[r] - previous) / h[-1] * h[r] / f[r]
            previous = h[r]
        aps.append(ap)
        for k in top_k:
            kth = np.sort(d)[k - 1]
            sure, tied = rel[d < kth].sum(), rel[d == kth]
            slots = k - (d < kth).sum()
            low[k] += sure + max(0, slots - (~tied).sum())
            high[k] += sure + min(slots, tied.sum())
    precision = np.where(found > 0, hits / np.maximum(found, 1), 0).mean(0)
    assert len(set(np.round(aps, 3))) > 80 and min(aps) < 0.1 and max(aps) > 0.9  # many different APs
    assert m["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert m["P@r<=2"] == pytest.approx(precision[2], abs=1e-12)
    assert m["pr"]["precision"] == pytest.approx(precision.tolist(), abs=1e-12)
    assert m["pr"]["recall"] == pytest.approx((hits / hits[:, -1:]).mean(0).tolist(), abs=1e-12)
    for k in top_k:
        assert low[k] / (k * len(queries)) - 1e-12 <= m[f"P@{k}"] <= high[k] / (k * len(queries)) + 1e-12, k
