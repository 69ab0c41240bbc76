"""``discvae index`` and ``discvae search``: a Bernoulli run's binary codes of a collection of images in a faiss
binary index, and the ``k`` nearest items of query images by Hamming distance (exact: ``faiss.IndexBinaryFlat``).

A collection (and the queries) is one of:

* ``NAME:SPLIT``: a split (``train``, ``test``, or ``all``, train then test, the default) of ``mnist``,
  ``fashion-mnist`` or ``digits``;
* ``FILE.npy``: an array of images, memory-mapped (``np.load(mmap_mode="r")``);
* ``FILE.npz`` or ``FILE.npz:KEY``: the archive's only array, or its array KEY. A member of a zip archive cannot be
  memory-mapped and ``np.load`` would read it whole, so it is streamed through ``zipfile`` a batch of rows at a time
  (archives of ``np.savez`` and of ``np.savez_compressed`` alike);
* in Python also an array or tensor ``[N, ...]``.

Each item has the run's image shape or as many values (taken in row-major order), uint8 (0-255) or float in [0, 1] as
training data. The images are encoded ``batch_size`` at a time, so a collection larger than memory works: only the
codes (8 bytes per item up to 64 bits) are held. Under torchrun each rank encodes its contiguous share of the rows.
They are fed as the run was evaluated, except that a run trained with dynamic binarisation sees them thresholded at
1/2 (the most probable binarisation), so that an image's code depends on no random draw, batch or rank.

An index is a folder: ``codes.faiss`` (``faiss.write_index_binary`` of the ``IndexBinaryFlat`` of the codes, as
``retrieval.pack`` lays them out), ``ids.npy`` (the collection row of each code) and ``index.json`` (the digest of
the run, ``runs.run_digest``; its latent, the code length, the number of codes, the collection), each written
atomically, ``index.json`` last. Loading it with a run checks that digest: an index built with another run, or before
the run was trained further, is refused.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import zipfile
import zlib
from pathlib import Path

import faiss
import numpy as np

from .. import distributed
from ..data import DATASETS, _images, load_dataset
from ..distributed import split_rows
from ..distributions import Bernoulli
from ..errors import InputError
from ..likelihoods import binarize
from ..runs import atomic_path, run_digest, write_json
from .codes import SPLITS, code_block, load_coded_run, split_images
from .retrieval import pack

INDEX, IDS, META = "codes.faiss", "ids.npy", "index.json"
FORMAT = 1
FORMATS = ("json", "csv")


class HashIndex:
    """Exact Hamming k-nearest-neighbour search over a Bernoulli run's codes of a collection, scikit-learn style.

    ``fit(data)`` encodes a collection (see the module docstring) into ``index_`` (a ``faiss.IndexBinaryFlat``) with
    the row ids ``ids_``; ``search(queries, k)`` encodes query images and returns the distances and ids of their
    ``k`` nearest items; ``save(folder)`` writes the index, ``HashIndex.load(folder, run_dir)`` reads it back.

    Args:
        run_dir: a trained run with one Bernoulli block (beside Gaussian ones at most).
        batch_size: images per encoder call.
        data_dir: where ``NAME:SPLIT`` collections are found (default: the run's).
    """

    def __init__(self, run_dir, batch_size: int = 1024, data_dir=None):
        self.run_dir, self.batch_size, self.data_dir = run_dir, batch_size, data_dir

    def fit(self, data) -> HashIndex:
        """Encode the collection ``data``; under torchrun every rank encodes its share and gets the whole index."""
        self._load_run()
        with open_collection(data, self._data_dir()) as (items, what):
            self._check_shape(items, what)
            parts = split_rows(len(items), lambda start, stop: self._codes(items, start, stop, what))
        self.index_ = faiss.IndexBinaryFlat(self._width() * 8)
        self.index_.add(np.concatenate(parts))
        self.ids_ = np.arange(self.index_.ntotal, dtype=np.int64)
        self.data_ = what
        return self

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items of each query image (given as ``fit``'s data), nearest first: their Hamming
        distances (int32) and ids (int64), each ``[Q, k]``; ``k`` is clipped to the number of items."""
        if k < 1:
            raise InputError("k must be at least 1", "k")
        with open_collection(queries, self._data_dir()) as (items, what):
            self._check_shape(items, what)
            codes = self._codes(items, 0, len(items), what)
        distances, rows = self.index_.search(codes, min(k, self.index_.ntotal))
        return distances, self.ids_[rows]

    def save(self, folder) -> Path:
        """Write the index into ``folder`` (created if needed): ``ids.npy``, ``codes.faiss``, then ``index.json``."""
        folder = Path(folder)
        with atomic_path(folder / IDS) as tmp, open(tmp, "wb") as fh:
            np.save(fh, self.ids_)
        with atomic_path(folder / INDEX) as tmp:
            faiss.write_index_binary(self.index_, str(tmp))
        write_json(folder / META, {"format": FORMAT, "run": str(Path(self.run_dir).resolve()), "digest": self.digest_,
                                   "latent": str(self.model_.space), "bits": self.bits_, "count": self.index_.ntotal,
                                   "data": self.data_})
        return folder

    @classmethod
    def load(cls, folder, run_dir, batch_size: int = 1024, data_dir=None) -> HashIndex:
        """The index saved in ``folder``, for searching with ``run_dir``: refused unless it was built with that run
        as it is now."""
        self = cls(run_dir, batch_size, data_dir)
        folder = Path(folder)
        meta = _read_meta(folder)
        self._load_run()
        if meta["digest"] != self.digest_:
            raise InputError(f"{folder} was built with another run ({meta['run']}), or before {run_dir} was trained "
                             "further; build it again with this run")
        try:
            self.index_ = faiss.read_index_binary(str(folder / INDEX))
            self.ids_ = np.load(folder / IDS, allow_pickle=False)
        except (RuntimeError, OSError, ValueError, EOFError) as err:
            raise InputError(f"cannot read the index in {folder}: {str(err).strip().splitlines()[0]}") from None
        if self.index_.code_size != self._width():
            raise InputError(f"{folder / INDEX} holds codes {self.index_.code_size * 8} bits wide; {run_dir}'s "
                             f"{self.bits_}-bit codes take {self._width() * 8}")
        if not self.index_.ntotal == len(self.ids_) == meta["count"]:
            raise InputError(f"{folder} is incomplete or mixed ({self.index_.ntotal} codes, {len(self.ids_)} ids, "
                             f"{meta['count']} in {META}); build it again")
        self.data_ = meta["data"]
        return self

    def _load_run(self) -> None:
        if self.batch_size < 1:
            raise InputError("batch_size must be at least 1", "batch_size")
        self.cfg_, self.model_, data = load_coded_run(self.run_dir, Bernoulli)
        self.digest_ = run_digest(self.run_dir)
        self.input_shape_, self.bits_ = tuple(data.x_train.shape[1:]), code_block(self.model_).size

    def _data_dir(self):
        return self.data_dir or self.cfg_.data_dir

    def _width(self) -> int:
        """Bytes per packed code: whole 64-bit words (``retrieval.pack``)."""
        return 8 * -(-self.bits_ // 64)

    def _check_shape(self, items, what: str) -> None:
        """An ``InputError`` unless ``items`` are ``[N, ...]``, N > 0, with as many values per item as an image of
        the run."""
        if len(items.shape) < 2 or not len(items):
            raise InputError(f"{what}: expected a non-empty array of items [N, ...], got shape {items.shape}")
        size, need = math.prod(items.shape[1:]), math.prod(self.input_shape_)
        if size != need:
            raise InputError(f"{what}: items of shape {tuple(items.shape[1:])} ({size} values); {self.run_dir} "
                             f"takes images of shape {self.input_shape_} ({need} values)")

    def _codes(self, items, start: int, stop: int, what: str) -> np.ndarray:
        """The packed codes of ``items[start:stop]``, encoded ``batch_size`` rows at a time, ``[n, _width()]``."""
        mode = "threshold" if self.cfg_.binarize == "dynamic" else self.cfg_.binarize
        codes = [np.zeros((0, self._width()), np.uint8)]
        for i in range(start, stop, self.batch_size):
            rows = np.asarray(items[i:min(i + self.batch_size, stop)])
            x = binarize(_images(rows.reshape(len(rows), *self.input_shape_), what), mode)
            codes.append(pack(self.model_.codes(x, self.batch_size).numpy()))
        return np.concatenate(codes)


def build_index(run_dir, data, out, batch_size: int = 1024, data_dir=None) -> HashIndex:
    """``HashIndex(run_dir, batch_size, data_dir).fit(data)`` saved into the folder ``out``; under torchrun the ranks
    share the encoding and rank 0 writes."""
    index = HashIndex(run_dir, batch_size, data_dir).fit(data)
    if distributed.rank() == 0:
        index.save(out)
    return index


def format_results(distances: np.ndarray, ids: np.ndarray, fmt: str = "json") -> str:
    """Search results as text: ``json``, a list of ``{"query", "ids", "distances"}`` (one query a line), or ``csv``
    with the columns query, rank, id, distance (rank 0 the nearest)."""
    if check_format(fmt) == "json":
        return "[\n" + ",\n".join(json.dumps({"query": q, "ids": i.tolist(), "distances": d.tolist()})
                                  for q, (i, d) in enumerate(zip(ids, distances, strict=True))) + "\n]\n"
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["query", "rank", "id", "distance"])
    writer.writerows((q, r, i, d) for q, (row, dist) in enumerate(zip(ids.tolist(), distances.tolist(), strict=True))
                     for r, (i, d) in enumerate(zip(row, dist, strict=True)))
    return text.getvalue()


def check_format(fmt: str) -> str:
    """``fmt`` if it is one of ``FORMATS``, else an ``InputError``."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


@contextlib.contextmanager
def open_collection(data, data_dir=None):
    """``(items, what)`` for the ``with`` block: the collection ``data`` (module docstring) as an array-like
    ``[N, ...]`` that is sliced by rows, and a name for it in messages."""
    if not isinstance(data, (str, os.PathLike)):
        array = np.asarray(data)
        yield array, f"array of shape {array.shape}"
        return
    spec = str(data)
    base, _, key = spec.rpartition(":")
    if base.lower().endswith(".npz") or spec.lower().endswith(".npz"):
        with _NpzArray(*((base, key) if base.lower().endswith(".npz") else (spec, None))) as items:
            yield items, spec
    elif spec.lower().endswith(".npy"):
        yield _memory_mapped(Path(spec).expanduser()), spec
    else:
        name, _, split = spec.partition(":")
        if name not in DATASETS:
            raise InputError(f"unknown collection {spec!r}: give NAME:SPLIT (NAME one of {', '.join(DATASETS)}, "
                             f"SPLIT one of {', '.join(SPLITS)}), FILE.npy or FILE.npz[:KEY]")
        yield split_images(load_dataset(name, data_dir), split or "all")[0].numpy(), spec


def _memory_mapped(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"{path}: cannot read it as a NumPy .npy file ({err})") from None


class _NpzArray:
    """One array of an ``.npz`` archive, read a block of rows at a time through ``zipfile`` (a context manager).
    Rows read in order are decompressed once; a stored (``np.savez``) member is seeked into."""

    def __init__(self, path, key: str | None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as err:
            raise InputError(f"{self.path}: cannot read it as a NumPy .npz file ({err})") from None
        try:
            self._open(key)
        except BaseException:
            self._zip.close()
            raise

    def _open(self, key: str | None) -> None:
        names = [n.removesuffix(".npy") for n in self._zip.namelist() if n.endswith(".npy")]
        if key is None and len(names) != 1:
            raise InputError(f"{self.path} holds the arrays {', '.join(names) or 'none'}: name one as "
                             f"{self.path}:KEY")
        key = names[0] if key is None else key
        if key not in names:
            raise InputError(f"{self.path} has no array {key!r}; it holds {', '.join(names) or 'none'}")
        self._fh = self._zip.open(f"{key}.npy")
        try:
            version = np.lib.format.read_magic(self._fh)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                raise ValueError(f"unsupported .npy format version {version}")
            self.shape, fortran, self.dtype = header[version](self._fh)
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise InputError(f"{self.path}:{key}: cannot read its .npy header ({err})") from None
        if fortran or self.dtype.hasobject or not self.shape:
            raise InputError(f"{self.path}:{key}: expected a C-ordered array of numbers [N, ...]")
        self._start, self._row = self._fh.tell(), self.dtype.itemsize * math.prod(self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        n = max(stop - start, 0)
        try:
            self._fh.seek(self._start + start * self._row)
            raw = self._fh.read(n * self._row)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise InputError(f"{self.path}: corrupt archive ({err})") from None
        if len(raw) != n * self._row:
            raise InputError(f"{self.path}: truncated array (rows {start}-{stop} missing)")
        return np.frombuffer(raw, self.dtype).reshape(n, *self.shape[1:])

    def __enter__(self) -> _NpzArray:
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()
        self._zip.close()


def _read_meta(folder: Path) -> dict:
    path = folder / META
    if not path.is_file():
        raise InputError(f"{folder} is not a discvae index (no {META})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not {"digest", "count", "run"} <= set(meta):
        raise InputError(f"{path} is not the metadata of a discvae index (format {FORMAT})")
    return meta
