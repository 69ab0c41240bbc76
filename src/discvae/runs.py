"""Run directories: ``config.json``, ``metrics.csv``, ``checkpoint.pt`` and figures.

Guarantees (README, "Safety and failure behaviour"):

* every file is written atomically and durably: into a temporary file beside it, ``fsync``'d, renamed over the
  target, then the directory ``fsync``'d -- a reader sees the old file or the new one, never a mix;
* a checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain data only, so opening a checkpoint
  from someone else never runs code; anything else is refused; it carries a digest of its contents, verified on
  load, and every entry is checked for its type and range (``state.check_state`` checks the weights and the
  optimizer state against the model);
* one process at a time trains in a run directory (an exclusive ``flock`` on ``RUN_DIR/.lock``, which names the
  holder's pid); no output is written over a run's own files or into a run that is training (``check_output``).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import stat
import tempfile
from pathlib import Path

import torch

from .errors import InputError

CONFIG, METRICS, CHECKPOINT, LOCK = "config.json", "metrics.csv", "checkpoint.pt", ".lock"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, LOCK)  # what no command but train writes in a run directory
INDEX_FILES = ("codes.faiss", "ids.npy", "index.json")  # an index folder's files (applications.search), nothing else
JSON_BYTES, JSON_DEPTH = 1 << 20, 32  # the most bytes and levels of nesting read from a JSON file
BEST = "best"  # the run of the best epoch by --keep-best, inside the run directory

# what a training checkpoint holds, with the type of each entry
CHECKPOINT_KEYS = {"config": dict, "model": dict, "optimizer": dict, "shuffle": torch.Tensor, "rng": torch.Tensor,
                   "cuda_rng": list, "epoch": int, "step": int, "elapsed": float, "history": list}
DIGEST = "digest"  # the checkpoint's entry holding the SHA-256 of the others (``content_digest``)
TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")  # the names ``_new_temporary`` makes


def run_label(run_dir) -> str:
    """The name a run goes by in the reports of ``retrieval`` and ``clustering``: its directory's name, or
    ``PARENT/best`` for the best epoch kept inside a run (``--keep-best``), so that the best epochs of several runs
    are told apart."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}" if path.name == BEST else path.name


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success ``fsync`` it, rename it over ``path`` and ``fsync`` the
    directory (a durable atomic write), else remove it. The file gets the mode a plain ``open()`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        yield Path(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _new_temporary(path: Path, directory: bool = False) -> Path:
    """A new empty file (or ``directory``) ``.NAME.RANDOM.tmp`` beside ``path``, created with mode 0666 (0777) less
    the umask as a plain ``open()`` (``mkdir``) would (the system applies the umask: it is never read or set, which
    would race with other threads; ``tempfile.mkstemp`` would make it 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # matches TEMPORARY
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # 2^-48 per existing temporary
            continue


def staging_directory(path) -> Path:
    """A new empty directory ``.NAME.RANDOM.tmp`` beside ``path`` (which ``TEMPORARY`` matches), to be filled and
    moved to ``path`` by ``replace_directory``."""
    return _new_temporary(Path(path), directory=True)


def replace_directory(staged, target) -> Path | None:
    """Rename the directory ``staged`` (beside ``target``) to ``target`` in one step, durably (both directories and
    their parent ``fsync``'d): onto a missing or empty ``target``, or swapped with an existing one (``renameat2``'s
    ``RENAME_EXCHANGE`` on Linux, ``renamex_np``'s ``RENAME_SWAP`` on macOS), so that ``target`` is at every moment
    the old directory or the new one. Returns where the old one now is (``staged``'s name) for the caller to
    remove, None if there was none; an ``InputError`` where the file system cannot swap directories."""
    staged, target = Path(staged), Path(target)
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    _fsync(staged, flags)
    try:
        os.rename(staged, target)  # POSIX: onto a missing or an empty directory
        old = None
    except OSError as err:
        if not target.is_dir() or err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not _exchange(staged, target):
            raise InputError(f"cannot replace {target} in one step on this file system; remove it first or choose "
                             "another folder") from None
        old = staged
    _fsync(target.parent, flags)
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` atomically; False where neither system call exists or the file system
    does not support it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        done = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif hasattr(libc, "renamex_np"):
        done = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_run(folder) -> bool:
    """Whether ``folder`` is a discvae run directory (it holds a ``config.json`` or a ``checkpoint.pt``)."""
    return any((Path(folder) / name).is_file() for name in (CONFIG, CHECKPOINT))


def is_index(folder) -> bool:
    """Whether ``folder`` looks like a discvae index folder (its ``index.json`` beside its codes or ids)."""
    folder = Path(folder)
    return (folder / INDEX_FILES[2]).is_file() and any((folder / name).exists() for name in INDEX_FILES[:2])


def enclosing(path, test) -> Path | None:
    """The nearest folder above ``path`` (its real path, symbolic links resolved) for which ``test`` holds."""
    return next((folder for folder in Path(path).resolve().parents if test(folder)), None)


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporaries (``.NAME.RANDOM.tmp``, as ``atomic_path`` names them) that writes killed half-way left
    in ``folder`` if it is a run directory (``is_run``); nothing else. Call it only while holding the folder's lock,
    so no live write is removed."""
    if not is_run(folder):
        return []
    stale = [p for p in Path(folder).iterdir() if TEMPORARY.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path) -> list[dict]:
    try:
        with open(path, newline="") as fh:
            return [{k: _float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read {path}: {_reason(err)}") from None


def _float(value) -> float:
    try:
        return float(value) if value not in ("", None) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` with its ``content_digest`` under ``DIGEST``, atomically."""
    with atomic_path(path) as tmp:
        torch.save({**state, DIGEST: content_digest(state)}, tmp)


def content_digest(obj) -> str:
    """SHA-256 of ``obj`` (nested dicts, lists, tuples, tensors and scalars): each tensor's dtype, shape and bytes,
    everything else by its ``repr``. torch does not verify a checkpoint archive's CRCs; this finds flipped bytes."""
    sha = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            sha.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            sha.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            sha.update(f"D{len(x)}".encode())
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            sha.update(f"{type(x).__name__[0]}{len(x)}".encode())
            for item in x:
                feed(item)
        else:
            sha.update(f"{type(x).__name__}:{x!r};".encode())
    feed(obj)
    return sha.hexdigest()


def load_checkpoint(run_dir, device="cpu") -> dict:
    """The training checkpoint of ``run_dir``, loaded without running code (``weights_only=True``), its digest
    verified (a checkpoint written before digests has none) and checked to hold every entry of ``CHECKPOINT_KEYS``
    with its type and a value in range (``check_entries``); returned without ``DIGEST``."""
    path = _checkpoint_path(run_dir)
    return _read_checkpoint(path, path, device)


def run_snapshot(run_dir, device="cpu") -> tuple[dict, str]:
    """``load_checkpoint(run_dir, device)`` and the ``run_digest`` of the very files it was read from: the checkpoint
    hashed is the one loaded, even while the run trains (a new checkpoint is renamed into place; the file open here
    stays the old one)."""
    config, path = _config_path(run_dir), _checkpoint_path(run_dir)
    digest = hashlib.sha256()
    try:
        with open(config, "rb") as fh:
            _feed(digest, fh)
        with open(path, "rb") as fh:
            _feed(digest, fh)
            fh.seek(0)
            return _read_checkpoint(fh, path, device), digest.hexdigest()
    except OSError as err:
        raise InputError(f"cannot read {err.filename or path}: {_reason(err)}") from None


def _checkpoint_path(run_dir) -> Path:
    """``run_dir``'s checkpoint file; an ``InputError`` saying why there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not Path(run_dir).is_dir():
        raise InputError(f"{run_dir} is not a run directory")
    if not path.is_file():
        if (Path(run_dir) / CONFIG).is_file():
            raise InputError(f"{run_dir} has no checkpoint yet (its training stopped before the first epoch "
                             "ended); start it again without --resume")
        raise InputError(f"{run_dir} is not a run directory (no {CHECKPOINT})")
    return path


def _read_checkpoint(source, path: Path, device) -> dict:
    """The checkpoint in ``source`` (the file ``path``, or a file object open on it), as ``load_checkpoint``
    returns it."""
    try:
        ckpt = torch.load(source, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL (\S+)", str(err))
        if unsafe:
            raise InputError(f"refusing checkpoint {path}: it asks for {unsafe.group(1)}, and loading anything but "
                             "tensors and plain data could run code") from None
        raise InputError(f"cannot read checkpoint {path}: corrupt or not a PyTorch file") from None
    except Exception as err:  # torch raises many types on a corrupt file
        raise InputError(f"cannot read checkpoint {path}: {_reason(err)}") from None
    if isinstance(ckpt, dict) and DIGEST in ckpt:
        ckpt = dict(ckpt)
        saved = ckpt.pop(DIGEST)
        try:
            intact = saved == content_digest(ckpt)
        except (RecursionError, RuntimeError, TypeError, ValueError):
            intact = False
        if not intact:
            raise InputError(f"{path} is corrupt: its contents do not match their digest (damaged on disk or in "
                             "transfer); restore it from a copy or train again")
    check_entries(ckpt, path)
    return ckpt


def check_entries(ckpt, path) -> None:
    """An ``InputError`` unless ``ckpt`` holds every entry of ``CHECKPOINT_KEYS`` with its type (a bool is not an
    int) and a value in range: ``epoch`` >= 1 rows of ``history`` (dicts of numbers, row i for epoch i + 1),
    ``step`` >= ``epoch``, ``elapsed`` finite and >= 0, random states of torch's CPU generator's size."""
    wrong = [k for k, kind in CHECKPOINT_KEYS.items()
             if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), kind) or isinstance(ckpt.get(k), bool)]
    if wrong:
        raise InputError(f"{path} is not a discvae checkpoint (missing or malformed: {', '.join(wrong)})")
    history, epoch = ckpt["history"], ckpt["epoch"]
    problems = {
        "epoch": epoch >= 1 and epoch == len(history),
        "step": ckpt["step"] >= epoch,
        "elapsed": 0 <= ckpt["elapsed"] < math.inf,
        "history": all(_is_row(row, i + 1) for i, row in enumerate(history)),
        **{name: _is_rng_state(ckpt[name]) and ckpt[name].shape == torch.get_rng_state().shape
           for name in ("shuffle", "rng")},
        "cuda_rng": all(_is_rng_state(t) and t.dim() == 1 for t in ckpt["cuda_rng"]),
    }
    bad = [name for name, ok in problems.items() if not ok]
    if bad:
        shown = {"epoch": f"epoch {epoch} with {len(history)} rows of history", "step": f"step {ckpt['step']}",
                 "elapsed": f"elapsed {ckpt['elapsed']}"}
        raise InputError(f"{path} is not a valid discvae checkpoint (out of range or malformed: "
                         f"{', '.join(shown.get(name, name) for name in bad)})")


def _is_row(row, epoch: int) -> bool:
    """Whether ``row`` is the row of ``history`` (and ``metrics.csv``) of ``epoch``: numbers by name."""
    return isinstance(row, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(
        v, bool) for k, v in row.items()) and row.get("epoch") == epoch


def _is_rng_state(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype == torch.uint8


def run_digest(run_dir) -> str:
    """SHA-256 of ``run_dir``'s ``config.json`` and ``checkpoint.pt``: names the trained model (training it further
    changes it)."""
    digest = hashlib.sha256()
    for name in (CONFIG, CHECKPOINT):
        try:
            with open(Path(run_dir) / name, "rb") as fh:
                _feed(digest, fh)
        except OSError as err:
            raise InputError(f"cannot read {Path(run_dir) / name}: {_reason(err)}") from None
    return digest.hexdigest()


def _feed(digest, fh) -> None:
    while chunk := fh.read(1 << 20):
        digest.update(chunk)


def read_config(run_dir) -> dict:
    """``config.json`` of ``run_dir`` as a dict (its field types are checked by ``Config.from_dict``)."""
    return read_settings(_config_path(run_dir))


def _config_path(run_dir) -> Path:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir() or not path.exists():
        raise InputError(f"{run_dir} is not a run directory (no {CONFIG})")
    return path


def read_settings(path) -> dict:
    """The JSON object in the file ``path`` (a ``config.json``, or a settings file for ``train --config``), read as
    ``read_json`` reads it."""
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise InputError(f"{path} must hold a JSON object of settings, not {type(saved).__name__}")
    return saved


def read_json(path, dir_fd: int | None = None, shown=None):
    """The JSON value in the file ``path`` (relative to the directory ``dir_fd`` if given; called ``shown`` in
    messages): a regular file or a pipe (``--config <(...)``) of at most ``JSON_BYTES`` bytes, UTF-8, nested at
    most ``JSON_DEPTH`` levels deep; anything else is a one-line ``InputError``."""
    shown = shown or path
    data = read_bounded(path, JSON_BYTES, dir_fd, shown)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {shown}: {_reason(err)}") from None
    except RecursionError:
        value = None
        depth = JSON_DEPTH + 1
    else:
        depth = _depth(value)
    if depth > JSON_DEPTH:
        raise InputError(f"cannot read {shown}: nested more than {JSON_DEPTH} levels deep")
    return value


def _depth(value) -> int:
    """The levels of nesting of a JSON value (1 for a number or string), counted up to ``JSON_DEPTH + 1``, without
    recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= JSON_DEPTH:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((item, depth + 1) for item in items)
    return deepest


def read_bounded(path, limit: int, dir_fd: int | None = None, shown=None) -> bytes:
    """The bytes of the file ``path`` (relative to the directory ``dir_fd`` if given; called ``shown`` in messages):
    a regular file or a pipe, at most ``limit`` bytes of it; a device, a directory or more bytes is a one-line
    ``InputError``, and so is an ``OSError``. A pipe is opened without waiting for a writer."""
    shown = shown or path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    except OSError as err:
        raise InputError(f"cannot read {shown}: {_reason(err)}") from None
    info = os.fstat(fd)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        os.close(fd)
        raise InputError(f"cannot read {shown}: not a regular file")
    with open(fd, "rb", buffering=0) as fh:
        os.set_blocking(fd, True)
        chunks, size = [], 0
        try:
            while size <= limit and info.st_size <= limit and (chunk := fh.read(min(1 << 20, limit + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
        except OSError as err:
            raise InputError(f"cannot read {shown}: {_reason(err)}") from None
    if size > limit or info.st_size > limit:
        raise InputError(f"cannot read {shown}: larger than {limit} bytes")
    return b"".join(chunks)


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return text.splitlines()[0] if text else type(err).__name__


def check_output(path, kind: str = "directory") -> Path:
    """Fail now, before any work, if ``path`` cannot become (or be written into, for an existing directory) the
    output ``kind`` ("directory" or "file"): a file where a directory is needed or the reverse, a path under a
    file, no write permission, a read-only file system, one of a run's own files (``RUN_FILES``), a path in an
    index folder (``is_index``: its own files or beside them), a folder that a training process holds. Creates
    nothing."""
    path = Path(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise InputError(f"{path} is a directory, not a file")
    folder = path if kind == "directory" else path.parent
    if kind == "file" and path.name in RUN_FILES and is_run(folder):
        raise InputError(f"refusing to write {path}: it is a file of the run in {folder}; choose another output")
    index = folder if is_index(folder) else enclosing(folder, is_index)
    if index:
        raise InputError(f"refusing to write {path}: it is in the index {index}; choose another output")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InputError(f"cannot write to {existing}: {_reason(err)}") from None
    if existing == folder:
        check_idle(folder)
    return path


def check_idle(folder) -> None:
    """An ``InputError`` naming the holder's pid if a process holds the lock of the run directory ``folder``."""
    import fcntl  # POSIX

    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: nobody trains there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse_busy(folder, fd)
    finally:
        os.close(fd)


def _refuse_busy(folder, fd: int):
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    raise InputError(f"{folder} is in use by another discvae process (pid {holder})") from None


def _hold(fd: int, folder) -> None:
    """Take the exclusive ``flock`` of the open lock file ``fd`` and write this process's pid into it; an
    ``InputError`` naming ``folder`` and the holder's pid if another process holds it."""
    import fcntl  # POSIX

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse_busy(folder, fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextlib.contextmanager
def file_lock(path, folder):
    """Hold an exclusive lock (``flock`` on the file ``path``, created if needed and left in place) for the
    ``with`` block; while another process holds it, an ``InputError`` naming ``folder`` and that process's pid."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise InputError(f"cannot create {path}: {_reason(err)}") from None
    try:
        _hold(fd, folder)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold an exclusive lock on ``run_dir`` (created if needed) for the ``with`` block; a second holder gets an
    ``InputError`` naming the first one's pid. If the block fails, a lock file this call created is removed again,
    and so is a directory it created if nothing else was written into it."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    fresh = created or not (run_dir / LOCK).exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise InputError(f"cannot create {run_dir}: {_reason(err)}") from None
    try:
        _hold(fd, run_dir)
        try:
            yield run_dir
        except BaseException:
            if fresh:
                (run_dir / LOCK).unlink(missing_ok=True)
            if created and not any(run_dir.iterdir()):
                run_dir.rmdir()
            raise
    finally:
        os.close(fd)
