"""``discvae index`` / ``discvae search`` and ``HashIndex``: results against a brute-force Hamming computation,
every way of giving a collection, and one line and exit status 2 for each kind of bad input."""
import csv
import io
import json
import pickle
import shutil
import zipfile

import faiss
import numpy as np
import pytest

from discvae import load_dataset, load_run
from discvae.applications.search import HashIndex, _NpzArray, format_results, open_collection
from discvae.errors import InputError
from helpers import assert_one_line_error, run_cli, train_digits, write_idx_folder

N_DIGITS = 1797


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    return {"bits": train_digits(root / "bits", "--latent-dim", "16", "--epochs", "2"),
            "other": train_digits(root / "other", "--latent-dim", "65", "--seed", "1"),  # 2 words of 64 bits
            "cat": train_digits(root / "cat", "--latent", "categorical", "--latent-dim", "10"),
            "gauss": train_digits(root / "gauss", "--latent", "gaussian", "--estimator", "reparam")}


@pytest.fixture(scope="module")
def images():
    """The digits, train then test: float32 [1797, 1, 8, 8] in [0, 1]."""
    data = load_dataset("digits")
    return np.concatenate([data.x_train.numpy(), data.x_test.numpy()])


def brute_force(run, queries, collection) -> np.ndarray:
    """Hamming distances ``[Q, N]`` between the run's bits of the query and collection images."""
    model = load_run(run)[1]
    q, db = (model.codes(torch_of(x)).numpy() for x in (queries, collection))
    return (q[:, None, :] != db[None]).sum(-1)


def torch_of(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def assert_nearest(distances, ids, direct, k):
    """``(distances, ids)`` are an exact k-NN answer for the distance matrix ``direct`` (any order among ties)."""
    assert distances.shape == ids.shape == (len(direct), k)
    assert np.array_equal(distances, np.sort(direct, 1)[:, :k])
    assert np.array_equal(np.take_along_axis(direct, ids, 1), distances)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_index_and_search_from_the_cli_match_brute_force(runs, images, tmp_path, capsys):
    index, queries = tmp_path / "index", tmp_path / "queries.npy"
    np.save(queries, images[-20:, 0])  # [20, 8, 8]: one channel implied
    code, stdout, _ = run_cli(capsys, "index", runs["bits"], "--data", "digits:all", "--out", index,
                              "--batch-size", "500")
    assert code == 0 and stdout.strip() == f"{index}: {N_DIGITS} codes of 16 bits"
    assert {p.name for p in index.iterdir()} == {"codes.faiss", "ids.npy", "index.json"}
    meta = json.loads((index / "index.json").read_text())
    assert (meta["bits"], meta["count"], meta["latent"], meta["data"]) == (16, N_DIGITS, "bernoulli:16", "digits:all")

    code, stdout, _ = run_cli(capsys, "search", index, runs["bits"], "--query", queries, "-k", "10")
    assert code == 0
    records = json.loads(stdout)
    assert [r["query"] for r in records] == list(range(20))
    direct = brute_force(runs["bits"], images[-20:], images)
    assert_nearest(np.array([r["distances"] for r in records]), np.array([r["ids"] for r in records]), direct, 10)

    out = tmp_path / "hits.csv"
    code, stdout, _ = run_cli(capsys, "search", index, runs["bits"], "--query", "digits:test", "--k", "3",
                              "--format", "csv", "--out", out)
    assert code == 0 and stdout.strip() == str(out)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 297 * 3 and list(rows[0]) == ["query", "rank", "id", "distance"]
    ids = np.array([int(r["id"]) for r in rows]).reshape(297, 3)
    distances = np.array([int(r["distance"]) for r in rows]).reshape(297, 3)
    assert_nearest(distances, ids, brute_force(runs["bits"], images[-297:], images), 3)
    assert not list(tmp_path.glob(".*.tmp")) and not list(index.glob(".*.tmp"))


def test_python_api_fits_searches_saves_and_loads(runs, images, tmp_path):
    collection, queries = images[:1000], images[1500:1540]
    fitted = HashIndex(runs["bits"], batch_size=128).fit(collection)
    distances, ids = fitted.search(torch_of(queries), k=7)
    assert distances.dtype == np.int32 and ids.dtype == np.int64
    assert_nearest(distances, ids, brute_force(runs["bits"], queries, collection), 7)
    assert fitted.search(queries, k=5000)[0].shape == (40, 1000)  # k clipped to the collection
    assert fitted.search(queries)[0].shape == (40, 10)  # k = 10 by default
    assert np.array_equal(fitted.search(queries, k=1)[0], distances[:, :1])
    one_by_one = HashIndex(runs["bits"], batch_size=1).fit(collection[:50])
    assert np.array_equal(codes_of(one_by_one), codes_of(fitted)[:50 * 8])

    loaded = HashIndex.load(fitted.save(tmp_path / "index"), runs["bits"])
    assert loaded.data_ == "array of shape (1000, 1, 8, 8)"
    for a, b in zip(loaded.search(queries, 7), (distances, ids), strict=True):
        assert np.array_equal(a, b)


def codes_of(index: HashIndex) -> np.ndarray:
    return faiss.vector_to_array(index.index_.xb)


def test_npy_and_npz_collections_in_any_layout_give_the_same_codes(runs, images, tmp_path):
    as_uint8 = np.round(images * 255).astype(np.uint8)
    np.save(tmp_path / "flat.npy", as_uint8.reshape(N_DIGITS, 64))  # as many values per item: reshaped
    np.savez(tmp_path / "one.npz", x=as_uint8[:, 0])
    np.savez_compressed(tmp_path / "two.npz", x_train=as_uint8, labels=np.zeros(N_DIGITS, np.int64))
    with zipfile.ZipFile(tmp_path / "v2.npz", "w") as archive, archive.open("x.npy", "w") as fh:
        np.lib.format.write_array(fh, as_uint8, version=(2, 0))  # the .npy format 2.0 header (4-byte length)
    specs = [tmp_path / "flat.npy", f"{tmp_path / 'one.npz'}", f"{tmp_path / 'two.npz'}:x_train",
             tmp_path / "v2.npz"]
    reference = codes_of(HashIndex(runs["bits"]).fit(as_uint8))
    with open_collection(tmp_path / "flat.npy") as (items, _):
        assert isinstance(items, np.memmap)  # read a block at a time, never whole
    for spec in specs:  # batches of 100 rows: 18 reads, the last one short
        assert np.array_equal(codes_of(HashIndex(runs["bits"], batch_size=100).fit(spec)), reference), spec


def test_named_collections_are_read_from_the_data_dir_given(runs, images, tmp_path, capsys, monkeypatch):
    """``index`` and ``search`` with ``--data-dir D`` read ``mnist:SPLIT`` from ``D/mnist`` (the run, trained on the
    digits, has no MNIST folder of its own; the default data directory is empty); without it, from the data directory
    of the run."""
    monkeypatch.setenv("DISCVAE_DATA", str(tmp_path / "empty"))
    pixels = np.round(images[:, 0] * 255).astype(np.uint8)  # [1797, 8, 8], as MNIST's IDX files hold them
    labels = np.zeros(N_DIGITS, np.uint8)
    data = tmp_path / "data"
    write_idx_folder(data / "mnist", {"x_train": pixels[:1500], "y_train": labels[:1500], "x_test": pixels[1500:],
                                      "y_test": labels[1500:]})
    index = tmp_path / "index"
    code, stdout, _ = run_cli(capsys, "index", runs["bits"], "--data", "mnist:train", "--data-dir", data, "--out",
                              index)
    assert code == 0 and stdout.strip() == f"{index}: 1500 codes of 16 bits"
    code, stdout, _ = run_cli(capsys, "search", index, runs["bits"], "--query", "mnist:test", "--data-dir", data,
                              "-k", "4")
    assert code == 0
    records = json.loads(stdout)
    direct = brute_force(runs["bits"], *(np.float32(p[:, None] / 255) for p in (pixels[1500:], pixels[:1500])))
    assert_nearest(np.array([r["distances"] for r in records]), np.array([r["ids"] for r in records]), direct, 4)
    trained_here = train_digits(tmp_path / "run", "--dataset", "mnist", "--data-dir", data)
    code, stdout, _ = run_cli(capsys, "index", trained_here, "--data", "mnist:test", "--out", tmp_path / "own")
    assert code == 0 and stdout.strip() == f"{tmp_path / 'own'}: 297 codes of 8 bits"  # the run's data directory


def test_npz_rows_are_read_as_sliced_and_a_damaged_member_is_refused(images, tmp_path):
    """An ``.npz`` member read a block of rows at a time: any slice (an empty one, one past the end) as NumPy
    slices; rows the archive lacks, or bytes that do not decompress, one ``InputError`` naming the file."""
    rows = np.round(images[:40] * 255).astype(np.uint8)
    np.savez_compressed(tmp_path / "x.npz", x=rows)
    with _NpzArray(tmp_path / "x.npz", None) as items:
        for part in (slice(0, 40), slice(5, 5), slice(7, 3), slice(30, 99), slice(-4, None), slice(39, 40)):
            assert np.array_equal(items[part], rows[part]), part
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(rows))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:  # the header's 40 rows, 25 of them stored
        archive.writestr("x.npy", header.getvalue() + rows[:25].tobytes())
    with _NpzArray(tmp_path / "short.npz", None) as items:
        assert np.array_equal(items[10:20], rows[10:20])
        with pytest.raises(InputError) as caught:
            items[20:30]
    assert str(caught.value) == f"{tmp_path / 'short.npz'}: truncated array (rows 20-30 missing)"
    noise = np.random.default_rng(0).integers(0, 256, (2000, 64), dtype=np.uint8)  # 128 kB that do not compress
    np.savez_compressed(tmp_path / "noise.npz", x=noise)
    damaged = bytearray((tmp_path / "noise.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "noise.npz") as archive:
        info = archive.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the member's compressed bytes
    damaged[start + 100_000:start + 100_100] = bytes(100)  # past the header and the first rows
    (tmp_path / "bad.npz").write_bytes(bytes(damaged))
    with _NpzArray(tmp_path / "bad.npz", None) as items, pytest.raises(InputError) as caught:
        assert np.array_equal(items[0:100], noise[:100])
        items[100:2000]
    assert str(caught.value).startswith(f"{tmp_path / 'bad.npz'}: corrupt archive (")


def test_a_run_trained_on_dynamic_binarisation_indexes_thresholded_images(images, tmp_path):
    run = train_digits(tmp_path / "dynamic", "--binarize", "dynamic")
    fitted = HashIndex(run).fit(images)
    direct = brute_force(run, (images[:30] > 0.5).astype(np.float32), (images > 0.5).astype(np.float32))
    assert_nearest(*fitted.search(images[:30], 5), direct, 5)


def test_bad_input_gets_one_line_and_exit_status_2(runs, images, tmp_path, capsys):
    index, other = tmp_path / "index", tmp_path / "other"
    for run, folder in ((runs["bits"], index), (runs["other"], other)):
        assert run_cli(capsys, "index", run, "--data", "digits:test", "--out", folder)[0] == 0
    np.save(tmp_path / "q.npy", images[:5])
    np.save(tmp_path / "small.npy", images[:5, :, :7, :7])
    np.save(tmp_path / "flat60.npy", images[:5].reshape(5, 64)[:, :60])
    np.save(tmp_path / "grey.npy", images[:5] * 2)
    np.save(tmp_path / "flat5.npy", images[:5, 0, 0, 0])  # [5]: no item axis
    np.save(tmp_path / "none.npy", images[:0])
    with open(tmp_path / "pickled.npy", "wb") as fh:  # a pickle, not an .npy: never unpickled
        pickle.dump(images[:5], fh)
    pickled = ("cannot read it as a NumPy .npy file (This file contains pickled (object) data. If you trust the file "
               "you can load it unsafely using the `allow_pickle=` keyword argument or `pickle.load()`.)")
    np.savez(tmp_path / "pair.npz", a=images[:5], b=images[:5])
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "not_zip.npz").write_bytes(b"not a zip archive")
    np.savez(tmp_path / "scalar.npz", x=np.float32(1))
    with zipfile.ZipFile(tmp_path / "v3.npz", "w") as archive, archive.open("x.npy", "w") as fh:
        np.lib.format.write_array(fh, images[:5], version=(3, 0))  # a format the reader does not take
    np.savez(tmp_path / "fortran.npz", x=np.asfortranarray(images[:5]))
    mixed = tmp_path / "mixed"  # another run's codes under this index's metadata
    shutil.copytree(index, mixed)
    shutil.copy(other / "codes.faiss", mixed / "codes.faiss")
    q = tmp_path / "q.npy"
    bits, cat, gauss, other_run = (runs[name] for name in ("bits", "cat", "gauss", "other"))
    one_block = "latent; this needs one bernoulli block (beside Gaussian ones at most)"
    cases = [  # each error in full (what follows "error: ")
        (["index", cat, "--data", "digits:all", "--out", tmp_path / "x"], f"{cat} has a categorical:10 {one_block}"),
        (["index", gauss, "--data", "digits:all", "--out", tmp_path / "x"], f"{gauss} has a gaussian:8 {one_block}"),
        (["index", tmp_path / "norun", "--data", "digits:all", "--out", tmp_path / "x"],
         f"{tmp_path / 'norun'} is not a run directory (no config.json)"),
        (["index", bits, "--data", tmp_path / "missing.npy", "--out", tmp_path / "x"],
         f"{tmp_path / 'missing.npy'}: no such file"),
        (["index", bits, "--data", tmp_path / "missing.npz", "--out", tmp_path / "x"],
         f"{tmp_path / 'missing.npz'}: no such file"),
        (["index", bits, "--data", "cifar:train", "--out", tmp_path / "x"], "unknown collection 'cifar:train': give "
         "NAME:SPLIT (NAME one of mnist, fashion-mnist, digits, SPLIT one of train, test, all), FILE.npy or "
         "FILE.npz[:KEY]"),
        (["index", bits, "--data", "digits:val", "--out", tmp_path / "x"],
         "unknown split 'val'; choose one of train, test, all"),
        (["index", bits, "--data", tmp_path / "pair.npz", "--out", tmp_path / "x"],
         f"{tmp_path / 'pair.npz'} holds the arrays a, b: name one as {tmp_path / 'pair.npz'}:KEY"),
        (["index", bits, "--data", f"{tmp_path / 'pair.npz'}:c", "--out", tmp_path / "x"],
         f"{tmp_path / 'pair.npz'} has no array 'c'; it holds a, b"),
        (["index", bits, "--data", tmp_path / "empty.npz", "--out", tmp_path / "x"],
         f"{tmp_path / 'empty.npz'} holds the arrays none: name one as {tmp_path / 'empty.npz'}:KEY"),
        (["index", bits, "--data", f"{tmp_path / 'empty.npz'}:a", "--out", tmp_path / "x"],
         f"{tmp_path / 'empty.npz'} has no array 'a'; it holds none"),
        (["index", bits, "--data", tmp_path / "not_zip.npz", "--out", tmp_path / "x"],
         f"{tmp_path / 'not_zip.npz'}: cannot read it as a NumPy .npz file (File is not a zip file)"),
        (["index", bits, "--data", tmp_path / "v3.npz", "--out", tmp_path / "x"],
         f"{tmp_path / 'v3.npz'}:x: cannot read its .npy header (unsupported .npy format version (3, 0))"),
        (["index", bits, "--data", tmp_path / "scalar.npz", "--out", tmp_path / "x"],
         f"{tmp_path / 'scalar.npz'}:x: expected a C-ordered array of numbers [N, ...]"),
        (["index", bits, "--data", tmp_path / "fortran.npz", "--out", tmp_path / "x"],
         f"{tmp_path / 'fortran.npz'}:x: expected a C-ordered array of numbers [N, ...]"),
        (["index", bits, "--data", tmp_path / "grey.npy", "--out", tmp_path / "x"],
         f"{tmp_path / 'grey.npy'}: float values must lie in [0, 1], got [0, 2]"),
        (["index", bits, "--data", tmp_path / "small.npy", "--out", tmp_path / "x"], f"{tmp_path / 'small.npy'}: "
         f"items of shape (1, 7, 7) (49 values); {bits} takes images of shape (1, 8, 8) (64 values)"),
        (["index", bits, "--data", tmp_path / "flat5.npy", "--out", tmp_path / "x"],
         f"{tmp_path / 'flat5.npy'}: expected a non-empty array of items [N, ...], got shape (5,)"),
        (["index", bits, "--data", tmp_path / "none.npy", "--out", tmp_path / "x"],
         f"{tmp_path / 'none.npy'}: expected a non-empty array of items [N, ...], got shape (0, 1, 8, 8)"),
        (["index", bits, "--data", tmp_path / "pickled.npy", "--out", tmp_path / "x"],
         f"{tmp_path / 'pickled.npy'}: {pickled}"),
        (["index", bits, "--data", "digits:all", "--out", tmp_path / "x", "--batch-size", "0"],
         "--batch-size must be at least 1"),
        (["search", index, other_run, "--query", q], f"{index} was built with another run ({bits}), or before "
         f"{other_run} was trained further; build it again with this run"),
        (["search", mixed, bits, "--query", q],
         f"{mixed / 'codes.faiss'} holds codes 128 bits wide; {bits}'s 16-bit codes take 64"),
        (["search", index, bits, "--query", tmp_path / "small.npy"], f"{tmp_path / 'small.npy'}: items of shape "
         f"(1, 7, 7) (49 values); {bits} takes images of shape (1, 8, 8) (64 values)"),
        (["search", index, bits, "--query", tmp_path / "flat60.npy"], f"{tmp_path / 'flat60.npy'}: items of shape "
         f"(60,) (60 values); {bits} takes images of shape (1, 8, 8) (64 values)"),
        (["search", index, bits, "--query", tmp_path / "missing.npy"], f"{tmp_path / 'missing.npy'}: no such file"),
        (["search", index, bits, "--query", tmp_path / "grey.npy"],
         f"{tmp_path / 'grey.npy'}: float values must lie in [0, 1], got [0, 2]"),
        (["search", tmp_path / "nothing", bits, "--query", q],
         f"{tmp_path / 'nothing'} is not a discvae index (no index.json)"),
        (["search", index, cat, "--query", q], f"{cat} has a categorical:10 {one_block}"),
        (["search", index, bits, "--query", q, "-k", "0"], "--k must be at least 1"),
        (["search", index, bits, "--query", q, "--format", "xml"], "unknown format 'xml'; choose one of json, csv"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, message)
        assert err.strip() == f"discvae {argv[0]}: error: {message}"
    assert not (tmp_path / "x").exists()


def json_error(text: str) -> str:
    """What ``json.loads(text)`` says of ``text`` (the wording is Python's)."""
    with pytest.raises(json.JSONDecodeError) as caught:
        json.loads(text)
    return str(caught.value)


def test_a_damaged_index_folder_is_refused_in_full(runs, images, tmp_path, capsys):
    """What ``search`` says of an index folder whose files were changed or lost, each error in full."""
    built = tmp_path / "built"
    assert run_cli(capsys, "index", runs["bits"], "--data", "digits:test", "--out", built)[0] == 0
    np.save(tmp_path / "q.npy", images[:5])
    meta = json.loads((built / "index.json").read_text())

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(built, folder)
        change(folder)
        return folder
    not_json = damaged("not_json", lambda f: (f / "index.json").write_text("{"))
    cases = [
        (not_json, f"cannot read {not_json / 'index.json'}: {json_error('{')}"),
        *[(damaged(name, lambda f, m=m: (f / "index.json").write_text(json.dumps(m))),
           f"{tmp_path / name / 'index.json'} is not the metadata of a discvae index (format 1)")
          for name, m in (("format2", {**meta, "format": 2}), ("no_count", {k: v for k, v in meta.items()
                                                                           if k != "count"}), ("a_list", [meta]))],
        (damaged("no_ids", lambda f: (f / "ids.npy").unlink()),
         f"cannot read the index in {tmp_path / 'no_ids'}: [Errno 2] No such file or directory: "
         f"'{tmp_path / 'no_ids' / 'ids.npy'}'"),
        (damaged("pickled", lambda f: np.save(f / "ids.npy", np.array([None] * 297, dtype=object))),
         f"cannot read the index in {tmp_path / 'pickled'}: Object arrays cannot be loaded when allow_pickle=False"),
        (damaged("short", lambda f: np.save(f / "ids.npy", np.arange(296))),
         f"{tmp_path / 'short'} is incomplete or mixed (297 codes, 296 ids, 297 in index.json); build it again"),
    ]
    for folder, message in cases:
        code, _, err = run_cli(capsys, "search", folder, runs["bits"], "--query", tmp_path / "q.npy")
        assert_one_line_error(code, err, message)
        assert err.strip() == f"discvae search: error: {message}"


def test_results_as_text_json_by_default_and_csv_with_unix_lines():
    """``format_results``: JSON unless told, one query a line; CSV with ``\\n`` line ends (not the csv module's
    ``\\r\\n``), a row per hit, rank 0 the nearest."""
    distances, ids = np.array([[0, 3], [1, 1]], np.int32), np.array([[7, 2], [5, 9]], np.int64)
    assert format_results(distances, ids) == format_results(distances, ids, "json") == (
        '[\n{"query": 0, "ids": [7, 2], "distances": [0, 3]},\n{"query": 1, "ids": [5, 9], "distances": [1, 1]}\n]\n')
    assert format_results(distances, ids, "csv") == ("query,rank,id,distance\n0,0,7,0\n0,1,2,3\n1,0,5,1\n"
                                                     "1,1,9,1\n")
