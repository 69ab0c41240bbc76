"""Dataset loading: the IDX reader, the data directory, downloads (never over the network), digits, user files."""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from discvae import data
from discvae.data import load_dataset, read_idx, resolve_data_dir
from discvae.errors import InputError
from helpers import idx_bytes, write_gz, write_idx_folder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused at once, no network involved


def shared(name: str) -> Path:
    folder = SHARED_DATA / name
    if not all((folder / f).is_file() for f in data.IDX_FILES.values()):
        pytest.skip(f"real {name} files not found in {folder}")
    return folder


def write_idx_dataset(folder: Path, n_train: int = 6, n_test: int = 3, n_train_labels: int | None = None) -> None:
    """A tiny fake MNIST-layout folder."""
    rng = np.random.default_rng(0)
    counts = {"x_train": n_train, "y_train": n_train if n_train_labels is None else n_train_labels,
              "x_test": n_test, "y_test": n_test}
    write_idx_folder(folder, {key: rng.integers(0, 256, (n, 4, 5) if key.startswith("x") else (n,), dtype=np.uint8)
                              for key, n in counts.items()})


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- the IDX reader ---------------------------------------------------------------------------------------------


def test_read_idx_real_mnist():
    folder = shared("mnist")
    assert read_idx(folder / "train-images-idx3-ubyte.gz").shape == (60000, 28, 28)
    assert read_idx(folder / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
    assert np.bincount(read_idx(folder / "train-labels-idx1-ubyte.gz")).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(read_idx(folder / "t10k-labels-idx1-ubyte.gz")).tolist() == MNIST_TEST_COUNTS


def test_load_real_mnist():
    shared("mnist")
    d = load_dataset("mnist", SHARED_DATA)
    assert d.name == "mnist"
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    assert d.y_test.bincount().tolist() == MNIST_TEST_COUNTS


def test_fashion_mnist_found_in_system_dir(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", (shared("fashion-mnist"),))
    d = load_dataset("fashion-mnist", tmp_path)  # tmp_path holds nothing: the system dir is used
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_train.bincount().tolist() == [6000] * 10
    assert d.y_test.bincount().tolist() == [1000] * 10


def test_read_idx_plain_and_gzipped_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), array)
    np.testing.assert_array_equal(read_idx(write_gz(tmp_path / "a.gz", idx_bytes(array))), array)


def test_read_idx_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)) + bytes(range(256)) * 100)
    path = tmp_path / "cut.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match=r"cut\.gz: truncated or corrupt gzip file"):
        read_idx(path)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad.gz"
    write_gz(path, b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(InputError, match=r"bad\.gz: not an IDX file \(magic number 01020801"):
        read_idx(path)


def test_read_idx_unsupported_dtype(tmp_path):
    path = write_gz(tmp_path / "float.gz", b"\0\0\x0d\x01" + struct.pack(">I", 1) + b"\0\0\0\0")
    with pytest.raises(InputError, match=r"float\.gz: unsupported IDX data type 0x0d"):
        read_idx(path)


def test_read_idx_payload_shorter_than_header_says(tmp_path):
    path = write_gz(tmp_path / "short.gz", idx_bytes(np.zeros((10, 4), np.uint8))[:-5])
    with pytest.raises(InputError, match=r"short\.gz: truncated IDX file \(35 data bytes.*\(10, 4\) needs 40\)"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = write_gz(tmp_path / "head.gz", b"\0\0\x08\x03" + struct.pack(">I", 10))
    with pytest.raises(InputError, match=r"head\.gz: truncated IDX header"):
        read_idx(path)


def test_read_idx_trailing_garbage(tmp_path):
    path = write_gz(tmp_path / "long.gz", idx_bytes(np.zeros((10,), np.uint8)) + b"junk")
    with pytest.raises(InputError, match=r"long\.gz: 4 bytes of trailing garbage"):
        read_idx(path)


def test_load_idx_label_count_mismatch(tmp_path):
    write_idx_dataset(tmp_path / "mnist", n_train=6, n_train_labels=5)
    with pytest.raises(InputError, match=r"train-labels-idx1-ubyte\.gz: expected 6 integer labels"):
        load_dataset("mnist", tmp_path)


def test_load_small_idx_dataset(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    d = load_dataset("mnist", tmp_path)
    assert d.x_train.shape == (6, 1, 4, 5) and d.x_test.shape == (3, 1, 4, 5)
    assert d.y_train.shape == (6,) and d.y_train.dtype == torch.int64


def test_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", ())
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").touch()
    with pytest.raises(InputError) as info:
        load_dataset("fashion-mnist", tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "train-images-idx3-ubyte.gz" not in message
    assert str(tmp_path / "fashion-mnist") in message
    assert "--download" in message and "--data-dir" in message


# --- the data directory -----------------------------------------------------------------------------------------


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("DISCVAE_DATA", raising=False)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "discvae"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "discvae"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "discvae"
    monkeypatch.setenv("DISCVAE_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


# --- downloads (file:// mirrors and a refused local port: never the network) ------------------------------------


@pytest.fixture
def mirror(tmp_path):
    """A copy of the real MNIST files served through a file:// URL."""
    folder = tmp_path / "mirror"
    shutil.copytree(shared("mnist"), folder)
    return folder


def test_download_via_mirror_then_load(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", (UNREACHABLE, mirror.as_uri() + "/"))  # the first one fails
    d = load_dataset("mnist", tmp_path / "cache", download=True)
    assert d.x_train.shape == (60000, 1, 28, 28)
    folder = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(data.IDX_FILES.values())  # no temp files left
    assert {p.name: md5(p) for p in folder.iterdir()} == data.MD5["mnist"]


def test_download_skips_good_files_and_replaces_bad_ones(tmp_path, mirror, monkeypatch):
    folder = tmp_path / "mnist"
    shutil.copytree(mirror, folder)
    monkeypatch.setitem(data.MIRRORS, "mnist", (UNREACHABLE,))
    assert data.download_dataset("mnist", tmp_path) == folder  # nothing to fetch: no mirror is asked
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"stale")
    monkeypatch.setitem(data.MIRRORS, "mnist", (mirror.as_uri() + "/",))
    data.download_dataset("mnist", tmp_path)
    assert md5(folder / "t10k-labels-idx1-ubyte.gz") == data.MD5["mnist"]["t10k-labels-idx1-ubyte.gz"]


def test_download_offline(tmp_path, monkeypatch):
    monkeypatch.setitem(data.MIRRORS, "mnist", (UNREACHABLE,))
    with pytest.raises(InputError, match=r"could not download train-images-idx3-ubyte\.gz from any mirror "
                       r"\(last error: http://127\.0\.0\.1:9/.*are you offline\? put the files in .*mnist yourself"):
        load_dataset("mnist", tmp_path, download=True)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_download_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    bad_mirror = tmp_path / "bad"
    bad_mirror.mkdir()
    (bad_mirror / "train-images-idx3-ubyte.gz").write_bytes(b"not the real file")
    monkeypatch.setitem(data.MIRRORS, "mnist", (bad_mirror.as_uri() + "/",))
    with pytest.raises(InputError, match=r"train-images-idx3-ubyte\.gz has MD5 [0-9a-f]{32}, expected f68b3c"):
        data.download_dataset("mnist", tmp_path / "cache")
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_download_unknown_dataset():
    with pytest.raises(InputError, match="cannot download 'digits'"):
        data.download_dataset("digits", None)


# --- digits, user files, names ----------------------------------------------------------------------------------


def test_digits():
    d = load_dataset("digits")
    assert d.x_train.shape == (1500, 1, 8, 8) and d.x_test.shape == (297, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    assert set(d.y_train.tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits").x_test, d.x_test)  # the split is deterministic


def test_npy_uint8_images_split_last_tenth(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 5, 6), dtype=np.uint8)
    np.save(tmp_path / "mine.npy", images)
    d = load_dataset(str(tmp_path / "mine.npy"))
    assert d.x_train.shape == (18, 1, 5, 6) and d.x_test.shape == (2, 1, 5, 6)
    assert d.x_train.dtype == torch.float32 and d.y_train is None and d.y_test is None
    np.testing.assert_allclose(d.x_test.numpy()[:, 0], images[-2:] / 255, rtol=1e-6)


def test_npz_flat_floats_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x_train=rng.random((8, 12)), y_train=np.arange(8, dtype=np.int32),
             x_test=rng.random((3, 12)).astype(np.float32))
    d = load_dataset(str(tmp_path / "mine.npz"))
    assert d.x_train.shape == (8, 12) and d.x_test.shape == (3, 12)  # flat data stays flat
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64 and d.y_test is None
    assert d.y_train.tolist() == list(range(8))


def test_npz_without_x_test_splits_labels_too(tmp_path):
    np.savez(tmp_path / "mine.npz", x_train=np.zeros((10, 2, 3, 5), np.float32), y_train=np.arange(10))
    d = load_dataset(str(tmp_path / "mine.npz"))
    assert d.x_train.shape == (9, 2, 3, 5) and d.y_test.tolist() == [9]


@pytest.mark.parametrize("value, message", [(1.5, r"must lie in \[0, 1\], got \[0, 1\.5\]"), (np.nan, "NaN")])
def test_float_values_outside_unit_range(tmp_path, value, message):
    x = np.zeros((10, 4), np.float32)
    x[3, 2] = value
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(InputError, match=r"bad\.npy x_train: .*" + message):
        load_dataset(str(tmp_path / "bad.npy"))


def test_npz_wrong_keys(tmp_path):
    np.savez(tmp_path / "keys.npz", np.zeros((4, 3)))
    with pytest.raises(InputError, match=r"keys\.npz: expected arrays x_train .*found arr_0"):
        load_dataset(str(tmp_path / "keys.npz"))


def test_user_file_missing_or_unreadable(tmp_path):
    with pytest.raises(InputError, match=r"nope\.npz: no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npy").write_bytes(b"this is not numpy")
    with pytest.raises(InputError, match=r"junk\.npy: cannot read it as a NumPy"):
        load_dataset(str(tmp_path / "junk.npy"))


def test_user_file_bad_shapes(tmp_path):
    np.save(tmp_path / "vec.npy", np.zeros(10, np.uint8))
    with pytest.raises(InputError, match=r"vec\.npy x_train: expected a non-empty array"):
        load_dataset(str(tmp_path / "vec.npy"))
    np.savez(tmp_path / "mix.npz", x_train=np.zeros((4, 3, 3), np.uint8), x_test=np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(InputError, match=r"mix\.npz: x_test items have shape \(1, 3, 4\)"):
        load_dataset(str(tmp_path / "mix.npz"))


def test_unknown_dataset():
    with pytest.raises(InputError, match="unknown dataset 'cifar': choose one of mnist, fashion-mnist, digits"):
        load_dataset("cifar")


def test_digits_are_scikit_learns_read_without_importing_it():
    code = ("import json, sys\nfrom discvae.data import digits_arrays\nx, y = digits_arrays()\n"
            "print(json.dumps([x.tolist(), y.tolist(), 'sklearn' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    images, labels, imported = json.loads(proc.stdout)
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert not imported
    assert np.array_equal(np.array(images), digits.images) and np.array_equal(np.array(labels), digits.target)
