"""Run directories: ``config.json``, ``metrics.csv``, ``checkpoint.pt`` and figures.

Guarantees (README, "Safety and failure behaviour"):

* every file is written atomically and durably: into a temporary file beside it, ``fsync``'d, renamed over the
  target, then the directory ``fsync``'d -- a reader sees the old file or the new one, never a mix;
* a checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain data only, so opening a checkpoint
  from someone else never runs code; anything else is refused;
* one process at a time trains in a run directory (an exclusive ``flock`` on ``RUN_DIR/.lock``, which names the
  holder's pid).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import pickle
import re
import secrets
import tempfile
from pathlib import Path

import torch

from .errors import InputError

CONFIG, METRICS, CHECKPOINT, LOCK = "config.json", "metrics.csv", "checkpoint.pt", ".lock"
BEST = "best"  # the run of the best epoch by --keep-best, inside the run directory
# what a training checkpoint holds, with the type of each entry
CHECKPOINT_KEYS = {"config": dict, "model": dict, "optimizer": dict, "shuffle": torch.Tensor, "rng": torch.Tensor,
                   "cuda_rng": list, "epoch": int, "step": int, "elapsed": float, "history": list}


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


def _new_temporary(path: Path) -> Path:
    """A new empty file ``.NAME.RANDOM.tmp`` beside ``path``, created with mode 0666 less the umask as a plain
    ``open()`` would (the system applies the umask: it is never read or set, which would race with other threads;
    ``tempfile.mkstemp`` would make it 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # 2^-48 per existing temporary
            continue


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that writes killed half-way (``atomic_path``) left in ``folder``; call it
    only while holding the folder's lock, so no live write is removed."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
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
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run_dir, device="cpu") -> dict:
    """The training checkpoint of ``run_dir``, loaded without running code (``weights_only=True``) and checked to
    hold every entry of ``CHECKPOINT_KEYS`` with its type."""
    path = Path(run_dir) / CHECKPOINT
    if not Path(run_dir).is_dir():
        raise InputError(f"{run_dir} is not a run directory")
    if not path.is_file():
        if (Path(run_dir) / CONFIG).is_file():
            raise InputError(f"{run_dir} has no checkpoint yet (its training stopped before the first epoch "
                             "ended); start it again without --resume")
        raise InputError(f"{run_dir} is not a run directory (no {CHECKPOINT})")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL (\S+)", str(err))
        if unsafe:
            raise InputError(f"refusing checkpoint {path}: it asks for {unsafe.group(1)}, and loading anything but "
                             "tensors and plain data could run code") from None
        raise InputError(f"cannot read checkpoint {path}: corrupt or not a PyTorch file") from None
    except Exception as err:  # torch raises many types on a corrupt file
        raise InputError(f"cannot read checkpoint {path}: {_reason(err)}") from None
    wrong = [k for k, kind in CHECKPOINT_KEYS.items()
             if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), kind)]
    if wrong:
        raise InputError(f"{path} is not a discvae checkpoint (missing or malformed: {', '.join(wrong)})")
    return ckpt


def run_digest(run_dir) -> str:
    """SHA-256 of ``run_dir``'s ``config.json`` and ``checkpoint.pt``: names the trained model (training it further
    changes it)."""
    digest = hashlib.sha256()
    for name in (CONFIG, CHECKPOINT):
        try:
            with open(Path(run_dir) / name, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        except OSError as err:
            raise InputError(f"cannot read {Path(run_dir) / name}: {_reason(err)}") from None
    return digest.hexdigest()


def read_config(run_dir) -> dict:
    """``config.json`` of ``run_dir`` as a dict (its field types are checked by ``Config.from_dict``)."""
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir() or not path.exists():
        raise InputError(f"{run_dir} is not a run directory (no {CONFIG})")
    return read_settings(path)


def read_settings(path) -> dict:
    """The JSON object in the file ``path`` (a ``config.json``, or a settings file for ``train --config``)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {_reason(err)}") from None
    if not isinstance(saved, dict):
        raise InputError(f"{path} must hold a JSON object of settings, not {type(saved).__name__}")
    return saved


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return text.splitlines()[0] if text else type(err).__name__


def check_output(path, kind: str = "directory") -> Path:
    """Fail now, before any work, if ``path`` cannot become (or be written into, for an existing directory) the
    output ``kind`` ("directory" or "file"): a file where a directory is needed or the reverse, a path under a
    file, no write permission, a read-only file system. Creates nothing."""
    path = Path(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise InputError(f"{path} is a directory, not a file")
    folder = path if kind == "directory" else path.parent
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
    return path


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold an exclusive lock on ``run_dir`` (created if needed) for the ``with`` block; a second holder gets an
    ``InputError`` naming the first one's pid. A directory this call created is removed again if the block fails
    before writing anything into it."""
    import fcntl  # POSIX

    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise InputError(f"cannot create {run_dir}: {_reason(err)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"{run_dir} is in use by another discvae process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield run_dir
        except BaseException:
            if created and {p.name for p in run_dir.iterdir()} == {LOCK}:
                (run_dir / LOCK).unlink()
                run_dir.rmdir()
            raise
    finally:
        os.close(fd)
