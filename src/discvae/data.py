"""Datasets, held whole in memory as float32 tensors in [0, 1].

``load_dataset(name)`` accepts ``mnist``, ``fashion-mnist``, ``digits`` (scikit-learn's bundled 8x8 digits; it
needs no files) or the path of your own ``.npy``/``.npz`` file. Images have the shape ``[N, C, H, W]`` (a file's
``[N, H, W, C]`` is moved to it: ``_images``). Flat ``[N, D]`` data from your own files stays flat.

MNIST and Fashion-MNIST come from the four standard gzip IDX files in ``<data_dir>/mnist/`` and
``<data_dir>/fashion-mnist/``. The data directory is the ``data_dir`` argument (``--data-dir``), else
``$DISCVAE_DATA``, else ``$XDG_CACHE_HOME/discvae`` (by default ``~/.cache/discvae``). Fashion-MNIST is also
looked for in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). With
``download=True``, missing files are fetched from the official mirrors and their MD5s are checked.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import math
import os
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch

from .errors import InputError


class Dataset(NamedTuple):
    name: str
    x_train: torch.Tensor  # float32 [N, C, H, W] (or [N, D] for flat user data), values in [0, 1]
    y_train: torch.Tensor | None  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor | None


DATASETS = ("mnist", "fashion-mnist", "digits")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: the lengths of a channel axis
IDX_FILES = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
             "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}
MD5 = {
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion-mnist": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
}
MIRRORS = {"mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
           "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)}
SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
DOWNLOAD_TIMEOUT = 30  # seconds without data before a mirror counts as unreachable
DIGITS_TEST = 297  # digits: 1797 images, the last 297 of a fixed permutation are the test set
IDX_UBYTE = 0x08


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load a named dataset or a ``.npy``/``.npz`` file; ``download`` fetches missing MNIST/Fashion-MNIST files."""
    if name.lower().endswith((".npy", ".npz")):
        return _load_user_file(name)
    if name == "digits":
        return _load_digits()
    if name in MD5:
        return _load_idx_dataset(name, _idx_folder(name, resolve_data_dir(data_dir), download))
    raise InputError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or give a .npy/.npz file")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$DISCVAE_DATA``, else ``$XDG_CACHE_HOME/discvae`` or ``~/.cache/discvae``."""
    chosen = data_dir or os.environ.get("DISCVAE_DATA")
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    return cache / "discvae"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The uint8 array in a gzip'd or plain IDX file (a read-only view of the decompressed bytes)."""
    path = Path(path)
    raw = _read_maybe_gzipped(path)
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise InputError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, expected 0000xxxx)")
    if raw[2] != IDX_UBYTE:
        raise InputError(f"{path}: unsupported IDX data type 0x{raw[2]:02x} (only 0x08, unsigned byte, is supported)")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise InputError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size, payload = math.prod(dims), len(raw) - header
    if payload < size:
        raise InputError(f"{path}: truncated IDX file ({payload} data bytes, the header's shape {dims} needs {size})")
    if payload > size:
        raise InputError(f"{path}: {payload - size} bytes of trailing garbage after the data of shape {dims}")
    return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims)


def download_dataset(name: str, data_dir: str | os.PathLike | None) -> Path:
    """Fetch ``name``'s missing or corrupt IDX files into ``<data_dir>/<name>/``, checking MD5s; return the folder."""
    if name not in MD5:
        raise InputError(f"cannot download {name!r}: only {', '.join(MD5)} can be downloaded")
    folder = resolve_data_dir(data_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the data folder {folder}: {e.strerror or e}") from None
    for filename, md5 in MD5[name].items():
        target = folder / filename
        if not (target.is_file() and _md5_of_file(target) == md5):
            _fetch(name, filename, md5, folder)
    return folder


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: truncated or corrupt gzip file ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


def _idx_folder(name: str, data_dir: Path, download: bool) -> Path:
    """The first folder holding all four IDX files of ``name``, downloading them if allowed."""
    folders = (data_dir / name, *SYSTEM_DIRS.get(name, ()))
    for folder in folders:
        if all((folder / f).is_file() for f in IDX_FILES.values()):
            return folder
    if download:
        return download_dataset(name, data_dir)
    missing = ", ".join(f for f in IDX_FILES.values() if not (folders[0] / f).is_file())
    elsewhere = "".join(f" (nor complete in {f})" for f in folders[1:])
    raise InputError(f"{name}: missing {missing} in {folders[0]}{elsewhere}; pass --download to fetch the files, "
                     f"or --data-dir DIR for a folder holding {name}/")


def _load_idx_dataset(name: str, folder: Path) -> Dataset:
    arrays = {key: read_idx(folder / filename) for key, filename in IDX_FILES.items()}
    tensors = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        what = str(folder / IDX_FILES[f"x_{split}"])
        if x.ndim != 3:
            raise InputError(f"{what}: expected images of shape [N, H, W], got {x.shape}")
        tensors[f"x_{split}"] = _images(x, what)
        tensors[f"y_{split}"] = _labels(y, len(x), str(folder / IDX_FILES[f"y_{split}"]))
    return Dataset(name, **tensors)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(images [1797, 8, 8] in 0..16, labels)``, what ``load_digits()`` returns, read
    from the file it reads (``sklearn/datasets/data/digits.csv.gz``, found without importing scikit-learn, whose
    import takes seconds); ``load_digits`` itself where the file is not there."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _load_digits() -> Dataset:
    images, labels = digits_arrays()
    order = np.random.default_rng(0).permutation(len(labels))
    x = torch.from_numpy((images[order] / 16).astype(np.float32)[:, None])
    y = torch.from_numpy(labels[order].astype(np.int64))
    return Dataset("digits", x[:-DIGITS_TEST], y[:-DIGITS_TEST], x[-DIGITS_TEST:], y[-DIGITS_TEST:])


def _load_user_file(name: str) -> Dataset:
    """An ``.npz`` with x_train and optional x_test, y_train, y_test, or an ``.npy`` image array.

    Without x_test, the last 10% of x_train (and y_train) become the test set, in file order.
    """
    path = Path(name).expanduser()
    arrays = _read_arrays(path)
    if "x_train" not in arrays or not set(arrays) <= set(NPZ_KEYS):
        raise InputError(f"{path}: expected arrays x_train and optionally x_test, y_train, y_test; "
                         f"found {', '.join(sorted(arrays)) or 'none'}")
    x_train = _images(arrays["x_train"], f"{path} x_train")
    y_train = _labels(arrays.get("y_train"), len(x_train), f"{path} y_train")
    if "x_test" in arrays:
        x_test = _images(arrays["x_test"], f"{path} x_test")
        y_test = _labels(arrays.get("y_test"), len(x_test), f"{path} y_test")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise InputError(f"{path}: x_test items have shape {tuple(x_test.shape[1:])}, "
                             f"x_train items {tuple(x_train.shape[1:])}")
        return Dataset(name, x_train, y_train, x_test, y_test)
    if "y_test" in arrays:
        raise InputError(f"{path}: has y_test but no x_test")
    if len(x_train) < 2:
        raise InputError(f"{path}: x_train needs at least 2 items to split off a test set (or give x_test)")
    n_test = max(1, len(x_train) // 10)
    return Dataset(name, x_train[:-n_test], None if y_train is None else y_train[:-n_test],
                   x_train[-n_test:], None if y_train is None else y_train[-n_test:])


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive by name, or an ``.npy`` file's array as x_train."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return {"x_train": loaded}
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot read it as a NumPy .npy/.npz file ({e})") from None


def _images(x: np.ndarray, what: str) -> torch.Tensor:
    """float32 tensor: uint8 is divided by 255, float/bool must lie in [0, 1]; [N, H, W] gets a channel axis; of
    4 axes, a last one of length 1, 3 or 4 (grey, RGB, RGBA) is NumPy's and PIL's [N, H, W, C] and moved to the
    front unless the second is such a length too (ambiguous: refused); else the array is [N, C, H, W]."""
    if x.ndim not in (2, 3, 4) or 0 in x.shape:
        raise InputError(f"{what}: expected a non-empty array [N, H, W], [N, C, H, W] or [N, D] with no axis of "
                         f"length 0, got {x.shape}")
    if x.ndim == 4 and x.shape[3] in CHANNELS:
        if x.shape[1] in CHANNELS:
            raise InputError(f"{what}: cannot tell the channel axis of shape {x.shape}: give [N, C, H, W] or "
                             f"[N, H, W, C], with H and W not {', '.join(map(str, CHANNELS))}")
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.dtype == np.uint8:
        x = np.divide(x, 255, dtype=np.float32)
    elif np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise InputError(f"{what}: contains NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise InputError(f"{what}: float values must lie in [0, 1], got [{x.min():g}, {x.max():g}]")
    else:
        raise InputError(f"{what}: unsupported dtype {x.dtype}; expected uint8 (0-255) or float (0-1)")
    return torch.from_numpy(x[:, None] if x.ndim == 3 else x)


def _labels(y: np.ndarray | None, n: int, what: str) -> torch.Tensor | None:
    if y is None:
        return None
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{what}: expected {n} integer labels of shape [{n}], got {y.dtype} of shape {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _fetch(name: str, filename: str, md5: str, folder: Path) -> None:
    """Download ``filename`` from the first mirror that serves it with the right MD5, atomically into ``folder``."""
    last_error = "no mirrors configured"
    for mirror in MIRRORS[name]:
        url = mirror + filename
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                got = _copy_url(url, out)
            if got == md5:
                os.replace(tmp, folder / filename)
                return
            last_error = f"{url} has MD5 {got}, expected {md5}"
        except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: malformed URL
            last_error = f"{url}: {e}"
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise InputError(f"could not download {filename} from any mirror (last error: {last_error}); "
                     f"are you offline? put the files in {folder} yourself")


def _copy_url(url: str, out: BinaryIO) -> str:
    """Stream ``url`` into ``out``; return the MD5 of what was copied."""
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
