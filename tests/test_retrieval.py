"""Hashing evaluation: the metrics on hand-computed cases, Hamming distances three ways, the baselines and
``discvae retrieval`` end to end."""
import json
import shutil

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from sklearn.base import clone

from discvae.applications import retrieval as retrieval_module
from discvae.applications.retrieval import (
    ITQ,
    LSH,
    PCAH,
    evaluate_codes,
    hamming,
    hamming_knn,
    pack,
    pr_figure,
    query_grid,
    select_queries,
    write_report,
)
from helpers import assert_one_line_error, drawn, framed, run_cli, train_digits

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


def test_a_ratio_is_zero_where_its_denominator_is():
    from discvae.applications.retrieval import _ratio

    for _ in range(3):  # memory just freed and full of 7s: a result not written where b = 0 would show them
        np.full((40, 25), 7.0).sum()
        assert np.array_equal(_ratio(np.ones((40, 25)), np.zeros((40, 1))), np.zeros((40, 25)))
    assert np.array_equal(_ratio(np.array([1.0, 3.0]), np.array([0.0, 4.0])), [0.0, 0.75])


@pytest.mark.parametrize("n_bits", [3, 8, 50, 64, 100])
def test_packed_unpacked_and_faiss_hamming_distances_agree(n_bits):
    rng = np.random.default_rng(n_bits)
    q, db = rng.integers(0, 2, (7, n_bits), dtype=np.uint8), rng.integers(0, 2, (300, n_bits), dtype=np.uint8)
    direct = (q[:, None, :] != db[None]).sum(-1)
    packed_q, packed_db = pack(q), pack(db)
    assert packed_q.shape == (7, 8 * -(-n_bits // 64))
    assert np.array_equal(pack(q.astype(np.float32)), packed_q) and np.array_equal(pack(q == 1), packed_q)  # any 0/1
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
    assert np.array_equal(select_queries(labels), select_queries(labels, 100, 0))  # 100 per class, seed 0


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
    fitted = method(4, seed=2).fit(x)
    codes = fitted.transform(x)
    assert fitted.projection_.dtype == np.float32 and fitted.projection_.shape == (x.shape[1], 4)
    centred = x.astype(np.float32) - x.astype(np.float32).mean(0)  # the projection is fitted on centred data
    assert fitted.mean_.dtype == np.float32
    assert np.array_equal(fitted.projection_, method(4, seed=2)._projection(centred))
    assert codes.shape == (600, 4) and codes.dtype == np.uint8 and set(np.unique(codes)) == {0, 1}
    assert np.array_equal(codes, clone(method(4, seed=2)).fit_transform(x))
    assert method().get_params() == {"n_bits": 64, "seed": 0, **({"n_iter": 50} if method is ITQ else {})}
    assert method(4, seed=2).get_params()["seed"] == 2
    m = evaluate_codes(codes[:40], labels[:40], codes[40:], labels[40:], top_k=(10,))
    assert m["mAP"] > 0.5 and m["P@10"] > 0.75  # well separated blobs: 4 classes, chance 0.25


def test_itq_is_gong_and_lazebniks_iteration_from_a_seeded_orthogonal_start():
    """ITQ's projection against the algorithm written out here: W_pca R, R from the Q of a seeded Gaussian matrix,
    then 50 times B = sgn(V R) in {-1, 1} and R = U W^T for the SVD V^T B = U S W^T."""
    from sklearn.decomposition import PCA

    x = blobs()[0].astype(np.float32)
    xc = x - x.mean(0)
    w = PCA(4, random_state=0).fit(xc).components_.T.astype(np.float32)
    v = (xc @ w).astype(np.float64)
    r = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))[0]
    for _ in range(50):
        u, _, vt = np.linalg.svd(v.T @ np.where(v @ r > 0, 1.0, -1.0))
        r = u @ vt
    assert np.allclose(ITQ(4, seed=3).fit(x).projection_, (w @ r).astype(np.float32), atol=1e-5)


def test_itq_rotation_beats_plain_pca_directions():
    """With more bits than informative directions PCAH spends bits on noise; ITQ's rotation spreads the variance."""
    x, labels = blobs()
    maps = {method: evaluate_codes(codes[:40], labels[:40], codes[40:], labels[40:], top_k=(10,))["mAP"]
            for method in (PCAH, ITQ) for codes in [method(16).fit_transform(x)]}
    assert maps[ITQ] > maps[PCAH] + 0.3


def metrics_of(m_ap: float, n_bits: int) -> dict:
    """Metrics as ``evaluate_codes`` gives them, with made-up values."""
    curve = {"radius": list(range(n_bits + 1)), "precision": np.linspace(1, m_ap, n_bits + 1).tolist(),
             "recall": np.linspace(0.1, 1, n_bits + 1).tolist()}
    return {"mAP": m_ap, "P@500": m_ap + 0.01, "P@1000": m_ap + 0.002, "P@r<=2": m_ap / 2, "pr": curve}


RESULTS = {"run-a": {"8": metrics_of(0.4, 8)}, "run-b": {"12": metrics_of(0.5, 12)},
           "pcah": {"12": metrics_of(0.25, 12)}, "lsh": {"8": metrics_of(0.2, 8), "12": metrics_of(0.25, 12)},
           "itq": {"8": metrics_of(0.45, 8)}}


def test_the_pr_figure_has_a_panel_per_code_length_and_a_curve_per_method(monkeypatch):
    """Runs solid with dots, baselines dashed; a method keeps its colour across panels, methods differ."""
    fig = drawn(monkeypatch, lambda: pr_figure("x.png", RESULTS, ["run-a", "run-b"]))
    panels = {8: ["run-a", "lsh", "itq"], 12: ["run-b", "pcah", "lsh"]}
    colours = {}
    for ax, (n_bits, names) in zip(fig.axes, panels.items(), strict=True):
        assert ax.get_title() == f"{n_bits} bits: Hamming radius 0..{n_bits}"
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("recall", "precision")
        assert ax.get_xlim() == ax.get_ylim() == (0, 1.02)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == names
        for line, name in zip(ax.get_lines(), names, strict=True):
            curve = RESULTS[name][str(n_bits)]["pr"]
            assert line.get_label() == name
            assert line.get_xdata().tolist() == curve["recall"] and line.get_ydata().tolist() == curve["precision"]
            run = name.startswith("run")
            assert (line.get_linestyle(), line.get_marker()) == (("-", "o") if run else ("--", "None"))
            assert colours.setdefault(name, to_rgba(line.get_color())) == to_rgba(line.get_color())
    assert len(set(colours.values())) == 5


def test_the_query_grid_frames_each_query_blue_and_each_hit_of_another_class_red(monkeypatch):
    queries, retrieved = torch.rand(2, 1, 4, 4), torch.rand(2, 3, 1, 4, 4)
    correct = np.array([[True, False, True], [False, False, True]])
    captured = framed(monkeypatch, retrieval_module, lambda: query_grid("x.png", queries, correct, retrieved))
    for row, q, r in zip(captured["rows"], queries, retrieved, strict=True):
        assert torch.equal(row, torch.cat([q[None], r]))
    assert [(i, j, to_rgba(c)) for i, j, c in captured["frames"]] == [
        (0, 0, to_rgba("tab:blue")), (1, 0, to_rgba("tab:blue")), (0, 2, to_rgba("red")), (1, 1, to_rgba("red")),
        (1, 2, to_rgba("red"))]
    assert captured["title"] == "query | its 3 nearest database images by Hamming distance (red: another class)"


def test_the_report_states_the_protocol_and_ranks_methods_by_bits_then_map(tmp_path):
    """Rows by code length, then mAP (ties in the order of ``results``: pcah before lsh at 12 bits)."""
    protocol = {"dataset": "mnist", "queries": 1000, "per_class": 100, "database": 60000, "seed": 3}
    path = write_report(tmp_path, protocol, RESULTS, ["run-a", "run-b"], "run-b")
    assert path == tmp_path / "report.md"
    assert path.read_text() == """# Retrieval with binary codes: mnist

Queries: 1000 test images (up to 100 per class, drawn with seed 3); database: the 60000 training images; \
relevant: the same label; ranking by Hamming distance. mAP over the whole database (items at equal distance form \
one threshold), precision of the k nearest (500, 1000; ties as faiss returns them) and within Hamming radius 2 (0 \
where nothing lies within it). Baselines fitted on the database pixels: `lsh` (random projections), `pcah` (PCA), \
`itq` (PCA-ITQ, 50 iterations); discvae runs: `run-a`, `run-b`.

| method | bits | mAP | P@500 | P@1000 | P@r<=2 |
|---|---:|---:|---:|---:|---:|
| itq | 8 | 0.4500 | 0.4600 | 0.4520 | 0.2250 |
| run-a | 8 | 0.4000 | 0.4100 | 0.4020 | 0.2000 |
| lsh | 8 | 0.2000 | 0.2100 | 0.2020 | 0.1000 |
| run-b | 12 | 0.5000 | 0.5100 | 0.5020 | 0.2500 |
| pcah | 12 | 0.2500 | 0.2600 | 0.2520 | 0.1250 |
| lsh | 12 | 0.2500 | 0.2600 | 0.2520 | 0.1250 |

![precision-recall](pr_curves.png)

Nearest database images of 8 queries for `run-b`, the run with the highest mAP:

![queries](query_grid.png)
"""


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return {"bits": train_digits(root / "bits"), "bits12": train_digits(root / "bits12", "--latent-dim", "12"),
            "cat": train_digits(root / "cat", "--latent", "categorical", "--latent-dim", "10")}


def test_baselines_are_seeded_and_pca_based_ones_stop_at_the_pixel_dimension(tmp_path):
    """``method_codes``: each run's codes and, at its code length, LSH, PCAH and ITQ fitted on the database with the
    seed given -- PCAH and ITQ only up to as many bits as an image has pixels (64 for the digits)."""
    from discvae import load_dataset, load_run
    from discvae.applications.retrieval import BASELINES, baseline_codes, method_codes
    from discvae.evaluation import fixed_binarization

    data = load_dataset("digits")
    x_db, x_q = data.x_train[:300], data.x_test[:20]
    pixels_db, pixels_q = x_db.flatten(1).numpy(), x_q.flatten(1).numpy()
    for name, method in BASELINES.items():
        fitted = method(8, 3).fit(pixels_db)
        codes = baseline_codes(name, 8, 3, pixels_db, pixels_q)
        assert np.array_equal(codes[0], fitted.transform(pixels_db)) and np.array_equal(codes[1],
                                                                                        fitted.transform(pixels_q))
    assert not np.array_equal(baseline_codes("lsh", 8, 3, pixels_db, pixels_q)[0],
                              baseline_codes("lsh", 8, 0, pixels_db, pixels_q)[0])
    runs = {f"r{n}": load_run(train_digits(tmp_path / f"r{n}", "--latent-dim", n)) for n in ("64", "65")}
    codes = method_codes(runs, x_db, x_q, seed=3, batch_size=100)
    assert sorted(codes) == [("itq", 64), ("lsh", 64), ("lsh", 65), ("pcah", 64), ("r64", 64), ("r65", 65)]
    for key in [("lsh", 65), ("itq", 64)]:
        for got, want in zip(codes[key], baseline_codes(*key, 3, pixels_db, pixels_q), strict=True):
            assert np.array_equal(got, want), key
    cfg, model, _ = runs["r65"]
    assert np.array_equal(codes["r65", 65][1], model.codes(fixed_binarization(x_q, cfg.binarize)).numpy())


def test_retrieval_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run_cli(capsys, "retrieval", runs["bits"], runs["bits12"], "--out", out, "--per-class", "20")
    assert code == 0 and stdout.strip() == str(out / "report.md")
    result = json.loads((out / "retrieval.json").read_text())
    assert result["protocol"] == {"dataset": "digits", "queries": 200, "per_class": 20, "database": 1500, "seed": 0,
                                  "relevant": "same label", "top_k": [500, 1000], "radius": 2}
    assert result["runs"] == ["bits", "bits12"]
    assert {name: sorted(by_bits) for name, by_bits in result["results"].items()} == {
        "bits": ["8"], "bits12": ["12"], "lsh": ["12", "8"], "pcah": ["12", "8"], "itq": ["12", "8"]}
    for by_bits in result["results"].values():
        for n_bits, m in by_bits.items():
            assert all(0 <= m[k] <= 1 for k in ("mAP", "P@500", "P@1000", "P@r<=2"))
            assert set(m) == {"mAP", "P@500", "P@1000", "P@r<=2", "pr", "seconds"}
            assert isinstance(m["seconds"], float) and 0 <= m["seconds"] < 60 and round(m["seconds"], 2) == m["seconds"]
            assert len(m["pr"]["precision"]) == int(n_bits) + 1 and m["pr"]["recall"][-1] == pytest.approx(1)
    assert result["results"]["itq"]["8"]["mAP"] > 0.15  # above chance (about 0.1 for ten classes)
    report = (out / "report.md").read_text()
    best = max(("bits", "bits12"), key=lambda n: result["results"][n]["8" if n == "bits" else "12"]["mAP"])
    assert f"8 queries for `{best}`, the run with the highest mAP" in report
    assert "| itq | 8 |" in report and "pr_curves.png" in report and "query_grid.png" in report
    assert mpimg.imread(out / "pr_curves.png").shape[1] > mpimg.imread(out / "pr_curves.png").shape[0]  # 2 panels
    assert mpimg.imread(out / "query_grid.png").ndim == 3
    assert not list(out.glob(".*.tmp"))


def test_the_query_grid_shows_evenly_spaced_queries_and_the_nearest_items_of_the_best_run(runs, tmp_path,
                                                                                          monkeypatch):
    """``retrieval`` (seed 5, images encoded one at a time) draws 8 queries evenly spaced among its 200, with the 10
    database images nearest to each by the codes of the run of highest mAP, and whether each is of the query's
    class."""
    from discvae import load_run
    from discvae.applications.retrieval import baseline_codes
    from discvae.evaluation import fixed_binarization

    captured = {}
    monkeypatch.setattr(retrieval_module, "query_grid", lambda path, queries, correct, retrieved: captured.update(
        queries=queries, correct=correct, retrieved=retrieved))
    retrieval_module.retrieval([runs["bits"], runs["bits12"]], tmp_path, seed=5, per_class=20, batch_size=1)
    results = json.loads((tmp_path / "retrieval.json").read_text())["results"]
    best = runs[max(("bits", "bits12"), key=lambda n: results[n]["8" if n == "bits" else "12"]["mAP"])]
    cfg, model, data = load_run(best)
    drawn = select_queries(data.y_test.numpy(), 20, 5)
    queries = drawn[np.linspace(0, 199, 8).astype(int)]
    db, q = baseline_codes("lsh", 8, 5, data.x_train.flatten(1).numpy(), data.x_test[drawn].flatten(1).numpy())
    assert results["lsh"]["8"]["mAP"] == evaluate_codes(q, data.y_test.numpy()[drawn], db, data.y_train.numpy())["mAP"]
    assert torch.equal(captured["queries"], data.x_test[queries])
    codes = model.codes(fixed_binarization(torch.cat([data.x_train, data.x_test[queries]]), cfg.binarize)).numpy()
    db_codes, q_codes = codes[:len(data.x_train)], codes[len(data.x_train):]
    row_of = {image.numpy().tobytes(): i for i, image in enumerate(data.x_train)}
    assert captured["retrieved"].shape == (8, 10, 1, 8, 8)
    rows = np.array([[row_of[image.numpy().tobytes()] for image in r] for r in captured["retrieved"]])  # [8, 10]
    for q, shown in zip(q_codes, rows, strict=True):
        distances = (db_codes != q).sum(1)
        assert sorted(distances[shown]) == sorted(distances)[:10]
    assert np.array_equal(captured["correct"], data.y_train.numpy()[rows] == data.y_test.numpy()[queries, None])


def test_the_best_epochs_of_several_runs_are_labelled_by_their_runs(runs, tmp_path, capsys):
    for name in ("seed0", "seed1"):  # as --keep-best keeps them: RUN/best, a run inside the run
        shutil.copytree(runs["bits"], tmp_path / name / "best")
    code, _, _ = run_cli(capsys, "retrieval", tmp_path / "seed0" / "best", tmp_path / "seed1" / "best", "--out",
                         tmp_path / "out", "--per-class", "1")
    result = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert code == 0 and result["runs"] == ["seed0/best", "seed1/best"]
    assert result["protocol"]["queries"] == 10  # one per class
    assert result["results"]["seed0/best"]["8"]["mAP"] == result["results"]["seed1/best"]["8"]["mAP"]  # same weights


def test_retrieval_rejects_bad_input(runs, tmp_path, capsys):
    """Each refusal in full (what follows "error: "), and no result written."""
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x_train=np.random.default_rng(0).random((60, 8, 8)))
    nolabels = train_digits(tmp_path / "nolabels", "--dataset", unlabelled)
    untested = tmp_path / "untested.npz"  # labels for the training images only
    np.savez(untested, x_train=np.random.default_rng(0).random((60, 8, 8)), y_train=np.arange(60) % 3,
             x_test=np.random.default_rng(1).random((20, 8, 8)))
    no_test_labels = train_digits(tmp_path / "untested", "--dataset", untested)
    bits, cat = runs["bits"], runs["cat"]
    for argv, message in (
            ([cat], f"{cat} has a categorical:10 latent; this needs one bernoulli block (beside Gaussian ones at "
                    "most)"),
            ([tmp_path / "none"], f"{tmp_path / 'none'} is not a run directory (no config.json)"),
            ([nolabels], f"retrieval needs class labels, and dataset {str(unlabelled)!r} has none for its train split"),
            ([no_test_labels], f"retrieval needs class labels, and dataset {str(untested)!r} has none for its test "
                               "split"),
            ([bits, bits], "run directories need distinct names, other than lsh, pcah, itq, to label them: bits, bits"),
            ([bits, "--per-class", "0"], "--per-class and --batch-size must be at least 1"),
            ([bits, "--batch-size", "0"], "--per-class and --batch-size must be at least 1"),
            ([bits, "--seed", str(2 ** 32)], f"--seed must be between 0 and 2^32 - 1 = {2 ** 32 - 1}, got {2 ** 32}")):
        code, _, err = run_cli(capsys, "retrieval", *argv, "--out", tmp_path / "out")
        assert_one_line_error(code, err, message)
        assert err.strip() == f"discvae retrieval: error: {message}"
    assert not (tmp_path / "out" / "retrieval.json").exists()
