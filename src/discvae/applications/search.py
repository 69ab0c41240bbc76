"""``discvae index`` and ``discvae search``: a Bernoulli run's binary codes of a collection of images in a faiss
binary index, and the ``k`` nearest items of query images by Hamming distance (exact: ``faiss.IndexBinaryFlat``).

A collection (and the queries) is one of:

* ``NAME:SPLIT``: a split (``train``, ``test``, or ``all``, train then test, the default) of ``mnist``,
  ``fashion-mnist`` or ``digits``;
* ``FILE.npy``: an array of images, read a batch of rows at a time (never memory-mapped: a file truncated while it
  is read is a one-line error, where a mapping would die of SIGBUS);
* ``FILE.npz`` or ``FILE.npz:KEY``: the archive's only array, or its array KEY, streamed through ``zipfile`` a batch
  of rows at a time (archives of ``np.savez`` and of ``np.savez_compressed`` alike);
* in Python also an array or tensor ``[N, ...]``.

Each item has the run's image shape or as many values (taken in row-major order), uint8 (0-255) or float in [0, 1] as
training data. The images are encoded ``batch_size`` at a time, so a collection larger than memory works: only the
codes (8 bytes per item up to 64 bits) are held. Under torchrun each rank encodes its contiguous share of the rows.
They are fed as the run was evaluated, except that a run trained with dynamic binarisation sees them thresholded at
1/2 (the most probable binarisation), so that an image's code depends on no random draw, batch or rank.

An index is a folder holding three files and nothing else: ``codes.faiss`` (``faiss.write_index_binary`` of the
``IndexBinaryFlat`` of the codes, as ``retrieval.pack`` lays them out), ``ids.npy`` (the collection row of each code)
and ``index.json`` (format 2: the digest of the run, ``runs.run_digest``, of the very checkpoint the codes were
computed with; its latent, the code length in bits and bytes, the number of codes, the collection, the SHA-256 of
``codes.faiss`` and of ``ids.npy``, and of its own other entries). It is an artifact with integrity, like a
checkpoint (the digests find damage and mix-ups; they are no signature: whoever rewrites ``index.json`` can forge
an index):

* ``load`` reads the three files from one folder (opened once: a rebuild meanwhile does not mix them), refuses an
  index built with another run or before the run was trained further, and a ``codes.faiss`` or ``ids.npy`` that is
  not the file ``index.json`` records (swapped, from another index, damaged); it parses the codes itself (faiss never
  reads untrusted bytes) and checks the ids (integers >= 0, one axis, ``count`` of them). Files are read with a
  bound on their size (``runs.read_bounded``, ``runs.read_json``).
* ``save`` writes into a new folder beside the target and puts it in the target's place in one step
  (``runs.replace_directory``), under a lock (``flock`` on ``.NAME.lock`` beside it): a build killed at any moment
  leaves the old index or the new one, never a mix. It writes only a new or empty folder or over an index
  (``check_folder``): never into a run directory, nor inside a run or an index, nor into a folder holding anything
  else.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import struct
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
from ..runs import (
    INDEX_FILES,
    TEMPORARY,
    check_output,
    enclosing,
    file_lock,
    is_index,
    is_run,
    read_bounded,
    read_json,
    replace_directory,
    run_snapshot,
    staging_directory,
    write_bytes,
    write_json,
)
from .codes import SPLITS, code_block, load_coded_run, split_images
from .retrieval import pack

INDEX, IDS, META = INDEX_FILES
FORMAT = 2
FORMATS = ("json", "csv")
# what index.json holds, with the type of each entry (the ints in [1, 2^62)); sha256: the digest of the others
META_KEYS = {"format": int, "run": str, "digest": str, "latent": str, "bits": int, "code_size": int, "count": int,
             "data": str, "codes_sha256": str, "ids_sha256": str, "sha256": str}
# faiss's IndexBinaryFlat file: fourcc, d, code_size, ntotal, is_trained, metric_type, bytes of codes; then the codes
CODES_HEADER = struct.Struct("<4siiqBiQ")


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
        """Write the index into the folder ``folder``, whole or not at all (module docstring): a new folder beside
        it, holding ``ids.npy``, ``codes.faiss`` and ``index.json``, takes its place in one step, under its lock;
        refused (``check_folder``) unless ``folder`` is new, empty or an index. Returns ``folder``."""
        target = check_folder(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.with_name(f".{target.name}.lock"), target):
            check_folder(folder)  # again, now that no other builder can change it
            for stale in target.parent.iterdir():  # left by builds killed before they removed their folder
                temporary = TEMPORARY.fullmatch(stale.name)
                if temporary and temporary.group(1) == target.name:
                    _remove_index_folder(stale)
            staged = staging_directory(target)
            try:
                self._write(staged)
                old = replace_directory(staged, target)
            except BaseException:
                _remove_index_folder(staged)
                raise
            if old:
                _remove_index_folder(old)
        return Path(folder)

    def _write(self, folder: Path) -> None:
        """The index's three files in ``folder``, ``index.json`` recording the SHA-256 of the other two and of its
        own other entries."""
        ids = io.BytesIO()
        np.save(ids, self.ids_)
        files = {IDS: ids.getvalue(), INDEX: faiss.serialize_index_binary(self.index_).tobytes()}
        for name, data in files.items():
            write_bytes(folder / name, data)
        meta = {"format": FORMAT, "run": str(Path(self.run_dir).resolve()), "digest": self.digest_,
                "latent": str(self.model_.space), "bits": self.bits_, "code_size": self._width(),
                "count": self.index_.ntotal, "data": self.data_, "codes_sha256": _sha256(files[INDEX]),
                "ids_sha256": _sha256(files[IDS])}
        write_json(folder / META, {**meta, "sha256": _meta_digest(meta)})

    @classmethod
    def load(cls, folder, run_dir, batch_size: int = 1024, data_dir=None) -> HashIndex:
        """The index saved in ``folder``, for searching with ``run_dir``: an ``InputError`` unless it was built with
        that run as it is now and its files are the ones its ``index.json`` records, each what it should hold
        (module docstring)."""
        self = cls(run_dir, batch_size, data_dir)
        folder = Path(folder)
        with _opened(folder) as fd:
            meta = _read_meta(folder, fd)
            self._load_run()
            if meta["digest"] != self.digest_:
                raise InputError(f"{folder} was built with another run ({meta['run']!r}), or before {run_dir} was "
                                 "trained further; build it again with this run")
            count, width = meta["count"], self._width()
            if (meta["bits"], meta["code_size"]) != (self.bits_, width):
                raise InputError(f"{folder / META} records {meta['bits']}-bit codes of {meta['code_size']} bytes; "
                                 f"{run_dir}'s are {self.bits_} bits in {width} bytes; build it again")
            files = {name: read_bounded(name, limit, fd, folder / name)
                     for name, limit in ((INDEX, CODES_HEADER.size + count * width), (IDS, 8 * count + 4096))}
        for name, key in ((INDEX, "codes_sha256"), (IDS, "ids_sha256")):
            if _sha256(files[name]) != meta[key]:
                raise InputError(f"{folder / name} is not the file {META} records (swapped, from another index, or "
                                 "damaged); build the index again")
        self.index_ = _codes_index(files[INDEX], count, width, folder / INDEX)
        self.ids_ = _ids(files[IDS], count, folder / IDS)
        self.data_ = meta["data"]
        return self

    def _load_run(self) -> None:
        """The run, from one reading of its checkpoint: the codes and the digest come from the same one."""
        if self.batch_size < 1:
            raise InputError("batch_size must be at least 1", "batch_size")
        ckpt, self.digest_ = run_snapshot(self.run_dir)
        self.cfg_, self.model_, data = load_coded_run(self.run_dir, Bernoulli, ckpt)
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
    """``HashIndex(run_dir, batch_size, data_dir).fit(data)`` saved into the folder ``out`` (checked first:
    ``check_folder``); under torchrun the ranks share the encoding and rank 0 writes."""
    check_folder(out)
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


def check_folder(out) -> Path:
    """The real path (symbolic links resolved) of ``out`` if an index may be written there: a new or empty folder,
    or an index to rebuild; an ``InputError`` for a run directory, a path inside a run or an index, a folder holding
    anything else, and what ``runs.check_output`` refuses for its parent. Creates nothing."""
    path = Path(out)
    real = path.resolve()
    if real.exists() and not real.is_dir():
        raise InputError(f"{path} exists and is not a directory")
    around = enclosing(real, lambda folder: is_run(folder) or is_index(folder))
    if is_run(real) or around:
        where = "a run directory" if is_run(real) else f"inside the {'run' if is_run(around) else 'index'} {around}"
        raise InputError(f"refusing to write an index into {path}: it is {where}; choose another folder")
    if real.is_dir() and any(real.iterdir()) and not _rebuildable(real):
        raise InputError(f"refusing to write an index into {path}: it holds files that are not a discvae index; "
                         "give a new or empty folder, or an index to rebuild")
    check_output(real.parent)
    return real


def _rebuildable(folder: Path) -> bool:
    """Whether ``folder`` holds a discvae index (of any format) and nothing else but temporaries of its writes."""
    names = {p.name for p in folder.iterdir()}
    if not is_index(folder) or not all(name in INDEX_FILES or TEMPORARY.fullmatch(name) for name in names):
        return False
    try:
        meta = read_json(folder / META)
    except InputError:
        return False
    return isinstance(meta, dict) and meta.get("format") in (1, FORMAT) and "digest" in meta


def _remove_index_folder(folder: Path) -> None:
    """Delete the index files in ``folder`` and the temporaries of their writes, then ``folder`` if that emptied
    it; nothing else."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for p in folder.iterdir():
        if (p.name in INDEX_FILES or TEMPORARY.fullmatch(p.name)) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


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
    if base.lower().endswith(".npz") or spec.lower().endswith((".npz", ".npy")):
        where = (base, key) if base.lower().endswith(".npz") else (spec, None) if spec.lower().endswith(".npz") \
            else (spec,)
        with _StoredArray(*where) as items:
            yield items, spec
    else:
        name, _, split = spec.partition(":")
        if name not in DATASETS:
            raise InputError(f"unknown collection {spec!r}: give NAME:SPLIT (NAME one of {', '.join(DATASETS)}, "
                             f"SPLIT one of {', '.join(SPLITS)}), FILE.npy or FILE.npz[:KEY]")
        yield split_images(load_dataset(name, data_dir), split or "all")[0].numpy(), spec


class _StoredArray:
    """An array in NumPy's ``.npy`` format -- the file ``path``, or with ``key`` given the member ``KEY.npy`` of the
    ``.npz`` archive ``path`` (``key`` None: its only array) -- read a block of rows at a time (a context manager).
    Never memory-mapped: rows missing, from the start or because the file shrank while it is read, are an
    ``InputError``. Rows read in order are decompressed once; a file or a stored (``np.savez``) member is seeked
    into."""

    def __init__(self, path, *key: str | None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        self._closing = contextlib.ExitStack()
        try:
            if key:
                self._fh, self.name, size = self._member(*key)
            else:
                self._fh = self._closing.enter_context(open(self.path, "rb", buffering=0))  # reads what is there now
                self.name, size = str(self.path), os.fstat(self._fh.fileno()).st_size
            self._header(size)
        except BaseException:
            self._closing.close()
            raise

    def _member(self, key: str | None):
        """The open member of the archive, its name in messages, its size."""
        try:
            archive = self._closing.enter_context(zipfile.ZipFile(self.path))
        except (OSError, zipfile.BadZipFile) as err:
            raise InputError(f"{self.path}: cannot read it as a NumPy .npz file ({err})") from None
        names = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        if key is None and len(names) != 1:
            raise InputError(f"{self.path} holds the arrays {', '.join(names) or 'none'}: name one as "
                             f"{self.path}:KEY")
        key = names[0] if key is None else key
        if key not in names:
            raise InputError(f"{self.path} has no array {key!r}; it holds {', '.join(names) or 'none'}")
        try:
            fh = self._closing.enter_context(archive.open(f"{key}.npy"))
        except (OSError, zipfile.BadZipFile, NotImplementedError) as err:
            raise InputError(f"{self.path}: cannot read it as a NumPy .npz file ({err})") from None
        return fh, f"{self.path}:{key}", archive.getinfo(f"{key}.npy").file_size

    def _header(self, size: int) -> None:
        try:
            version = np.lib.format.read_magic(self._fh)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                raise ValueError(f"unsupported .npy format version {version}")
            self.shape, fortran, self.dtype = header[version](self._fh)
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise InputError(f"{self.name}: cannot read its .npy header ({str(err).splitlines()[0]})") from None
        if fortran or self.dtype.hasobject or not self.shape:
            raise InputError(f"{self.name}: expected a C-ordered array of numbers [N, ...]")
        self._start, self._row = self._fh.tell(), self.dtype.itemsize * math.prod(self.shape[1:])
        if self._row and size < self._start + len(self) * self._row:
            raise InputError(f"{self.name}: truncated array (holds {(size - self._start) // self._row} of its "
                             f"{len(self)} rows)")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        n = max(stop - start, 0)
        try:
            self._fh.seek(self._start + start * self._row)
            raw = self._fh.read(n * self._row)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise InputError(f"{self.name}: corrupt file ({err})") from None
        if len(raw) != n * self._row:
            raise InputError(f"{self.name}: truncated array (rows {start}-{stop} missing)")
        return np.frombuffer(raw, self.dtype).reshape(n, *self.shape[1:])

    def __enter__(self) -> _StoredArray:
        return self

    def __exit__(self, *exc) -> None:
        self._closing.close()


@contextlib.contextmanager
def _opened(folder: Path):
    """A descriptor of the directory ``folder`` for the ``with`` block, to read its files from the folder that was
    there when it was opened even if a rebuild puts another one in its place meanwhile."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{folder} is not a discvae index (no {META})") from None
    except OSError as err:
        raise InputError(f"cannot read {folder}: {err.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _read_meta(folder: Path, fd: int) -> dict:
    """``index.json`` of the folder open as ``fd``, checked to hold every entry of ``META_KEYS`` with its type and
    to match its own digest."""
    path = folder / META
    try:
        os.stat(META, dir_fd=fd)
    except FileNotFoundError:
        raise InputError(f"{folder} is not a discvae index (no {META})") from None
    meta = read_json(META, fd, path)
    if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT):
        raise InputError(f"{path} is not the metadata of a discvae index (format {FORMAT})")
    if meta["format"] == 1:
        raise InputError(f"{folder} is an index of format 1, which records no digests of its files; build it again")
    bad = [key for key, kind in META_KEYS.items() if not isinstance(meta.get(key), kind)
           or isinstance(meta.get(key), bool) or (kind is int and not 1 <= meta[key] < 2**62)]
    if bad:
        raise InputError(f"{path} is not the metadata of a discvae index (missing or malformed: {', '.join(bad)})")
    if meta["sha256"] != _meta_digest(meta):
        raise InputError(f"{path} is corrupt: its entries do not match their digest (damaged or edited); build the "
                         "index again")
    return meta


def _meta_digest(meta: dict) -> str:
    """SHA-256 of the entries of ``index.json`` but its own digest ``sha256``."""
    return _sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())


def _codes_index(data: bytes, count: int, width: int, path: Path) -> faiss.IndexBinaryFlat:
    """The ``IndexBinaryFlat`` of ``count`` codes of ``width`` bytes that the file ``path`` holds as ``data``,
    parsed here (faiss's reader never sees untrusted bytes)."""
    fields = list(CODES_HEADER.unpack(faiss.serialize_index_binary(faiss.IndexBinaryFlat(width * 8)).tobytes()))
    fields[3], fields[-1] = count, count * width  # faiss's own header of an empty index, with the counts
    header = CODES_HEADER.pack(*fields)
    if not data.startswith(header) or len(data) != len(header) + count * width:
        raise InputError(f"{path} is not a faiss IndexBinaryFlat of {count} codes of {width * 8} bits")
    index = faiss.IndexBinaryFlat(width * 8)
    index.add(np.frombuffer(data, np.uint8, offset=len(header)).reshape(count, width))
    return index


def _ids(data: bytes, count: int, path: Path) -> np.ndarray:
    """The ids that the file ``path`` holds as ``data``: ``count`` integers >= 0 on one axis, as int64."""
    try:
        ids = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not (isinstance(ids, np.ndarray) and ids.shape == (count,) and ids.dtype.kind in "iu"
            and 0 <= ids.min() and ids.max() <= np.iinfo(np.int64).max):
        raise InputError(f"{path} does not hold {count} ids (integers >= 0 on one axis)")
    return ids.astype(np.int64)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
