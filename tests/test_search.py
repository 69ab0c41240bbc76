"""``discvae index`` / ``discvae search`` and ``HashIndex``: results against a brute-force Hamming computation,
every way of giving a collection, and one line and exit status 2 for each kind of bad input."""
import csv
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pytest

from discvae import load_dataset, load_run
from discvae.applications.search import HashIndex, _meta_digest, _StoredArray, format_results, open_collection
from discvae.errors import InputError
from helpers import assert_one_line_error, run_cli, train_digits, write_idx_folder

N_DIGITS = 1797


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    return {"bits": train_digits(root / "bits", "--latent-dim", "16", "--epochs", "2"),
            "other": train_digits(root / "other", "--latent-dim", "65", "--seed", "1"),  # 2 words of 64 bits
            "byte": train_digits(root / "byte"),  # 8 bits: one word of 64 bits, as "bits"
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
        assert isinstance(items, _StoredArray)  # read a block at a time, never whole nor memory-mapped
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
    with _StoredArray(tmp_path / "x.npz", None) as items:
        for part in (slice(0, 40), slice(5, 5), slice(7, 3), slice(30, 99), slice(-4, None), slice(39, 40)):
            assert np.array_equal(items[part], rows[part]), part
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(rows))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:  # the header's 40 rows, 25 of them stored
        archive.writestr("x.npy", header.getvalue() + rows[:25].tobytes())
    with pytest.raises(InputError) as caught:
        _StoredArray(tmp_path / "short.npz", None)
    assert str(caught.value) == f"{tmp_path / 'short.npz'}:x: truncated array (holds 25 of its 40 rows)"
    noise = np.random.default_rng(0).integers(0, 256, (2000, 64), dtype=np.uint8)  # 128 kB that do not compress
    np.savez_compressed(tmp_path / "noise.npz", x=noise)
    damaged = bytearray((tmp_path / "noise.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "noise.npz") as archive:
        info = archive.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the member's compressed bytes
    damaged[start + 100_000:start + 100_100] = bytes(100)  # past the header and the first rows
    (tmp_path / "bad.npz").write_bytes(bytes(damaged))
    with _StoredArray(tmp_path / "bad.npz", None) as items, pytest.raises(InputError) as caught:
        assert np.array_equal(items[0:100], noise[:100])
        items[100:2000]
    assert str(caught.value).startswith(f"{tmp_path / 'bad.npz'}:x: corrupt file (")


def test_an_npy_collection_truncated_while_it_is_read_is_an_error_not_a_crash(images, tmp_path):
    """Never memory-mapped (a mapping of a file that shrinks dies of SIGBUS): a file truncated before it is opened,
    or while its rows are read, is one ``InputError`` naming it."""
    rows = np.round(images[:40] * 255).astype(np.uint8)
    np.save(tmp_path / "x.npy", rows)
    with _StoredArray(tmp_path / "x.npy") as items:
        assert np.array_equal(items[0:10], rows[:10])
        with open(tmp_path / "x.npy", "r+b") as fh:
            fh.truncate(fh.seek(0, 2) - 64 * 15)  # 15 rows of 64 bytes gone
        assert np.array_equal(items[10:25], rows[10:25])
        with pytest.raises(InputError) as caught:
            items[25:40]
    assert str(caught.value) == f"{tmp_path / 'x.npy'}: truncated array (rows 25-40 missing)"
    with pytest.raises(InputError) as caught:
        _StoredArray(tmp_path / "x.npy")
    assert str(caught.value) == f"{tmp_path / 'x.npy'}: truncated array (holds 25 of its 40 rows)"


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
    pickled = ("cannot read its .npy header (the magic string is not correct; expected b'\\x93NUMPY', got "
               f"{(tmp_path / 'pickled.npy').read_bytes()[:6]!r})")
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
        (["search", index, other_run, "--query", q], f"{index} was built with another run ({str(bits)!r}), or "
         f"before {other_run} was trained further; build it again with this run"),
        (["search", mixed, bits, "--query", q], f"cannot read {mixed / 'codes.faiss'}: larger than 2409 bytes"),
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


def resealed(folder, **meta):
    """Make ``folder``'s ``index.json`` record the SHA-256 of the files there now (and the entries ``meta``), as a
    hostile author could."""
    path = folder / "index.json"
    new = {**json.loads(path.read_text()), **meta, **{
        f"{key}_sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for key, name in (("codes", "codes.faiss"), ("ids", "ids.npy"))}}
    path.write_text(json.dumps({**new, "sha256": _meta_digest(new)}))


def test_a_damaged_index_folder_is_refused_in_full(runs, images, tmp_path, capsys):
    """What ``search`` says of an index folder whose files were changed, swapped or lost, each error in full:
    ``index.json`` records the SHA-256 of the other two, and files that match a forged record are checked too."""
    built, other = tmp_path / "built", tmp_path / "other"
    assert run_cli(capsys, "index", runs["bits"], "--data", "digits:test", "--out", built)[0] == 0
    assert run_cli(capsys, "index", runs["byte"], "--data", "digits:test", "--out", other)[0] == 0
    np.save(tmp_path / "q.npy", images[:5])
    meta = json.loads((built / "index.json").read_text())

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(built, folder)
        change(folder)
        return folder

    def meta_of(name, value):
        return damaged(name, lambda f: (f / "index.json").write_text(value if isinstance(value, str) else
                                                                     json.dumps(value)))

    def ids_of(name, array, **entries):
        return damaged(name, lambda f: (np.save(f / "ids.npy", array), resealed(f, **entries)))
    not_json = meta_of("not_json", "{")
    not_ids = "does not hold 297 ids (integers >= 0 on one axis)"
    codes = ("is not the file index.json records (swapped, from another index, or damaged); build the index again")
    header = (built / "codes.faiss").read_bytes()[:33]
    cases = [
        (not_json, f"cannot read {not_json / 'index.json'}: {json_error('{')}"),
        *[(meta_of(name, m), f"{tmp_path / name / 'index.json'} is not the metadata of a discvae index (format 2)")
          for name, m in (("format3", {**meta, "format": 3}), ("a_list", [meta]), ("no_format", {"x": 1}))],
        (meta_of("format1", {**meta, "format": 1}),
         f"{tmp_path / 'format1'} is an index of format 1, which records no digests of its files; build it again"),
        (meta_of("no_count", {k: v for k, v in meta.items() if k != "count"}),
         f"{tmp_path / 'no_count' / 'index.json'} is not the metadata of a discvae index (missing or malformed: "
         "count)"),
        (meta_of("bad_types", {**meta, "count": True, "bits": 0, "run": None, "codes_sha256": 1}),
         f"{tmp_path / 'bad_types' / 'index.json'} is not the metadata of a discvae index (missing or malformed: "
         "run, bits, count, codes_sha256)"),
        (meta_of("nested", '{"x": ' + "[" * 40 + "]" * 40 + "}"),
         f"cannot read {tmp_path / 'nested' / 'index.json'}: nested more than 32 levels deep"),
        (meta_of("deep", "[" * 100000 + "]" * 100000),
         f"cannot read {tmp_path / 'deep' / 'index.json'}: nested more than 32 levels deep"),
        (meta_of("huge", json.dumps({**meta, "pad": "x" * (1 << 20)})),
         f"cannot read {tmp_path / 'huge' / 'index.json'}: larger than 1048576 bytes"),
        (damaged("a_folder", lambda f: ((f / "index.json").unlink(), (f / "index.json").mkdir())),
         f"cannot read {tmp_path / 'a_folder' / 'index.json'}: not a regular file"),
        (meta_of("edited", {**meta, "data": "digits:train"}), f"{tmp_path / 'edited' / 'index.json'} is corrupt: "
         "its entries do not match their digest (damaged or edited); build the index again"),
        (meta_of("no_digest", {k: v for k, v in meta.items() if k != "sha256"}),
         f"{tmp_path / 'no_digest' / 'index.json'} is not the metadata of a discvae index (missing or malformed: "
         "sha256)"),
        (damaged("hostile_run", lambda f: resealed(f, digest="0" * 64, run="x\ndiscvae search: ok")),
         f"{tmp_path / 'hostile_run'} was built with another run ('x\\ndiscvae search: ok'), or before "
         f"{runs['bits']} was trained further; build it again with this run"),
        (damaged("bits", lambda f: resealed(f, bits=8)), f"{tmp_path / 'bits' / 'index.json'} records 8-bit codes "
         f"of 8 bytes; {runs['bits']}'s are 16 bits in 8 bytes; build it again"),
        (damaged("no_ids", lambda f: (f / "ids.npy").unlink()),
         f"cannot read {tmp_path / 'no_ids' / 'ids.npy'}: No such file or directory"),
        (damaged("swapped", lambda f: shutil.copy(other / "codes.faiss", f / "codes.faiss")),
         f"{tmp_path / 'swapped' / 'codes.faiss'} {codes}"),
        (damaged("flipped", lambda f: (f / "codes.faiss").write_bytes(
            (lambda b: b[:-1] + bytes([b[-1] ^ 1]))((f / "codes.faiss").read_bytes()))),
         f"{tmp_path / 'flipped' / 'codes.faiss'} {codes}"),
        (damaged("ids_swapped", lambda f: np.save(f / "ids.npy", np.arange(297)[::-1])),
         f"{tmp_path / 'ids_swapped' / 'ids.npy'} {codes}"),
        (damaged("long_codes", lambda f: (f / "codes.faiss").write_bytes(bytes(33 + 297 * 8 + 1))),
         f"cannot read {tmp_path / 'long_codes' / 'codes.faiss'}: larger than {33 + 297 * 8} bytes"),
        (damaged("forged_codes", lambda f: ((f / "codes.faiss").write_bytes(header + bytes(296 * 8)), resealed(f))),
         f"{tmp_path / 'forged_codes' / 'codes.faiss'} is not a faiss IndexBinaryFlat of 297 codes of 64 bits"),
        (ids_of("pickled", np.array([None] * 297, dtype=object)), f"cannot read {tmp_path / 'pickled' / 'ids.npy'}: "
         "Object arrays cannot be loaded when allow_pickle=False"),
        *[(ids_of(name, array), f"{tmp_path / name / 'ids.npy'} {not_ids}") for name, array in (
            ("short", np.arange(296)), ("floats", np.arange(297.0)), ("negative", np.arange(297) - 1),
            ("strings", np.array([str(i) for i in range(297)])), ("two_d", np.arange(297)[:, None]),
            ("too_large", np.full(297, 2**64 - 1, np.uint64)), ("bools", np.ones(297, bool)))],
    ]
    for folder, message in cases:
        code, _, err = run_cli(capsys, "search", folder, runs["bits"], "--query", tmp_path / "q.npy")
        assert_one_line_error(code, err, message)
        assert err.strip() == f"discvae search: error: {message}"


def test_the_issue_reproductions_end_in_one_line_errors(runs, images, tmp_path, capsys):
    """Issue 49: an index holding another index's codes, and outputs that would overwrite an index's files."""
    idx, idx16 = tmp_path / "idx", tmp_path / "idx16"
    assert run_cli(capsys, "index", runs["byte"], "--data", "digits:train", "--out", idx)[0] == 0
    assert run_cli(capsys, "index", runs["bits"], "--data", "digits:train", "--out", idx16)[0] == 0
    kept = {p.name: p.read_bytes() for p in idx.iterdir()}
    shutil.copy(idx16 / "codes.faiss", idx / "codes.faiss")
    assert_one_line_error(*run_cli(capsys, "search", idx, runs["byte"], "--query", "digits:test", "-k", "3")[::2],
                          f"{idx / 'codes.faiss'} is not the file index.json records")
    (idx / "codes.faiss").write_bytes(kept["codes.faiss"])
    for argv in (["search", idx, runs["byte"], "--query", "digits:test", "--out", idx / "codes.faiss"],
                 ["search", idx, runs["byte"], "--query", "digits:test", "--out", idx / "index.json"],
                 ["search", idx, runs["byte"], "--query", "digits:test", "--out", idx / "hits.json"],
                 ["encode", runs["byte"], "--out", idx / "ids.npy"],
                 ["retrieval", runs["byte"], "--out", idx]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, f"refusing to write {argv[-1]}: it is in the index {idx}; choose another "
                              "output")
    assert {p.name: p.read_bytes() for p in idx.iterdir()} == kept
    assert run_cli(capsys, "search", idx, runs["byte"], "--query", "digits:test", "-k", "3")[0] == 0


def test_index_out_takes_a_new_or_empty_folder_or_an_index_and_nothing_else(runs, tmp_path, capsys):
    """``index --out`` refuses a run directory (through a symbolic link too), a path inside a run or an index, and a
    folder holding other files, each leaving it as it was; it fills an empty folder and rebuilds an index in place,
    leaving nothing beside it but its lock."""
    run = runs["byte"]
    (tmp_path / "link").symlink_to(run)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.json").write_text('{"format": 2}')
    built = tmp_path / "built"
    assert run_cli(capsys, "index", run, "--data", "digits:test", "--out", built)[0] == 0
    (tmp_path / "file").write_text("x")
    before = {p: p.read_bytes() for p in [*theirs.iterdir(), *built.iterdir(), *Path(run).iterdir()] if p.is_file()}
    others = "holds files that are not a discvae index; give a new or empty folder, or an index to rebuild"
    for out, why in ((run, "is a run directory"), (tmp_path / "link", "is a run directory"),
                     (Path(run) / "sub", f"is inside the run {Path(run).resolve()}"),
                     (built / "sub", f"is inside the index {built.resolve()}"), (theirs, others),
                     (tmp_path / "file", "exists and is not a directory")):
        code, _, err = run_cli(capsys, "index", run, "--data", "digits:test", "--out", out)
        message = f"{out} exists and is not a directory" if why.startswith("exists") else \
            f"refusing to write an index into {out}: it {why}"
        assert_one_line_error(code, err, message)
    assert {p: p.read_bytes() for p in before} == before and not (Path(run) / "sub").exists()
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", built):
        assert run_cli(capsys, "index", run, "--data", "digits:train", "--out", out)[0] == 0
        assert json.loads((out / "index.json").read_text())["count"] == 1500
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".built.lock", ".empty.lock"]


def test_a_second_builder_is_refused_while_one_writes(runs, tmp_path, capsys):
    from discvae.runs import file_lock

    index = tmp_path / "index"
    with file_lock(tmp_path / ".index.lock", index):
        code, _, err = run_cli(capsys, "index", runs["byte"], "--data", "digits:test", "--out", index)
    assert_one_line_error(code, err, f"{index} is in use by another discvae process (pid {os.getpid()})")
    assert not index.exists()


def test_results_as_text_json_by_default_and_csv_with_unix_lines():
    """``format_results``: JSON unless told, one query a line; CSV with ``\\n`` line ends (not the csv module's
    ``\\r\\n``), a row per hit, rank 0 the nearest."""
    distances, ids = np.array([[0, 3], [1, 1]], np.int32), np.array([[7, 2], [5, 9]], np.int64)
    assert format_results(distances, ids) == format_results(distances, ids, "json") == (
        '[\n{"query": 0, "ids": [7, 2], "distances": [0, 3]},\n{"query": 1, "ids": [5, 9], "distances": [1, 1]}\n]\n')
    assert format_results(distances, ids, "csv") == ("query,rank,id,distance\n0,0,7,0\n0,1,2,3\n1,0,5,1\n"
                                                     "1,1,9,1\n")
