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
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import tempfile
from pathlib import Path

import torch

from .errors import InputError

CONFIG, METRICS, CHECKPOINT, LOCK = "config.json", "metrics.csv", "checkpoint.pt", ".lock"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, LOCK)  # what no command but train writes in a run directory
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


def _new_temporary(path: Path) -> Path:
    """A new empty file ``.NAME.RANDOM.tmp`` beside ``path``, created with mode 0666 less the umask as a plain
    ``open()`` would (the system applies the umask: it is never read or set, which would race with other threads;
    ``tempfile.mkstemp`` would make it 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # matches TEMPORARY
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


def is_run(folder) -> bool:
    """Whether ``folder`` is a discvae run directory (it holds a ``config.json`` or a ``checkpoint.pt``)."""
    return any((Path(folder) / name).is_file() for name in (CONFIG, CHECKPOINT))


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
    except RecursionError:
        raise InputError(f"cannot read {path}: nested too deeply") from None
    if not isinstance(saved, dict):
        raise InputError(f"{path} must hold a JSON object of settings, not {type(saved).__name__}")
    return saved


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return text.splitlines()[0] if text else type(err).__name__


def check_output(path, kind: str = "directory") -> Path:
    """Fail now, before any work, if ``path`` cannot become (or be written into, for an existing directory) the
    output ``kind`` ("directory" or "file"): a file where a directory is needed or the reverse, a path under a
    file, no write permission, a read-only file system, one of a run's own files (``RUN_FILES``), a folder that a
    training process holds. Creates nothing."""
    path = Path(path)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory")
    if kind == "file" and path.is_dir():
        raise InputError(f"{path} is a directory, not a file")
    folder = path if kind == "directory" else path.parent
    if kind == "file" and path.name in RUN_FILES and is_run(folder):
        raise InputError(f"refusing to write {path}: it is a file of the run in {folder}; choose another output")
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


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold an exclusive lock on ``run_dir`` (created if needed) for the ``with`` block; a second holder gets an
    ``InputError`` naming the first one's pid. If the block fails, a lock file this call created is removed again,
    and so is a directory it created if nothing else was written into it."""
    import fcntl  # POSIX

    run_dir = Path(run_dir)
    created = not run_dir.exists()
    fresh = created or not (run_dir / LOCK).exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise InputError(f"cannot create {run_dir}: {_reason(err)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _refuse_busy(run_dir, fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
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
