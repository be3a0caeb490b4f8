"""The run directory as a resource: checked before anything is built, held by one run at a time, started clean
or resumed, and written atomically.

The CLI holds the directory (`hold_run_dir`: checks and lock) before it builds a model, and prepares it
(`prepare_run_dir`: start over or resume) once the recipe has been built, so a bad recipe changes nothing.
`Trainer.train` calls `prepare_run_dir` too; nested calls in the process that holds the directory re-enter it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mmalign.core.errors import MmalignError

LOCK_FILE = "run.lock"
LOG_FILE = "run.log"
# what a run writes into its directory; moved aside together when a run starts over (train.resume=false)
RUN_FILES = (
    "recipe.yaml",
    "metrics.jsonl",
    LOG_FILE,
    "before.json",
    "summary.json",
    "report.md",
    "curves.png",
    "checkpoints",
    "final",
)
RUN_FILE_PATTERNS = ("samples_*", "mels_*")  # sample files of the image and speech reports
# errors of a write that the run cannot fix by itself: the disk is full or the filesystem read-only
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class RunDirError(MmalignError, RuntimeError):
    """The output directory cannot hold this run: a file, not writable, full, or in use by another run."""

    label = "run directory error"


class NonFiniteMetricError(MmalignError, ValueError):
    """A metric is NaN or inf: it is named, never written or printed as JSON `NaN`."""

    label = "non-finite metric"


@dataclass
class _Hold:
    lock: FileLock
    prepared: bool = False  # started over or resumed: done once per hold


_HELD: dict[Path, _Hold] = {}  # run directories this process holds, for nested calls


@contextmanager
def hold_run_dir(path: str | Path) -> Iterator[Path]:
    """Check that `path` can hold a run (not a file, writable, not full) and lock it against a second writer."""
    with _holding(Path(path), resume=None) as run_dir:
        yield run_dir


@contextmanager
def prepare_run_dir(path: str | Path, *, resume: bool) -> Iterator[Path]:
    """`hold_run_dir`, then, unless resuming, move an earlier run's files aside (once per hold)."""
    with _holding(Path(path), resume=resume) as run_dir:
        yield run_dir


@contextmanager
def _holding(run_dir: Path, resume: bool | None) -> Iterator[Path]:
    """Only the main process touches the directory; every process gets the same RunDirError if it cannot be used.
    Inside the block, a write that fails because the disk is full or read-only becomes a RunDirError naming it."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    hold: _Hold | None = None
    failure: list[str | None] = [None]
    if PartialState().is_main_process:
        try:
            hold = _hold(run_dir, resume)
        except RunDirError as err:
            failure = [str(err)]
    broadcast_object_list(failure)
    if failure[0] is not None:
        raise RunDirError(failure[0])
    try:
        yield run_dir
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        raise RunDirError(
            f"writing {err.filename or run_dir} failed: {err.strerror}; free space (or make it writable) and run "
            "the same command again to resume from the last checkpoint"
        ) from err
    finally:
        if hold is not None:
            _release(run_dir, hold)


def _hold(run_dir: Path, resume: bool | None) -> _Hold:
    """Check and lock the directory, or re-enter it if this process holds it; then prepare it once."""
    key = run_dir.resolve()
    hold = _HELD.get(key)
    if hold is None:
        check_writable(run_dir)
        lock = FileLock(str(run_dir / LOCK_FILE), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunDirError(
                f"{run_dir} is in use by another run (it holds {run_dir / LOCK_FILE}); wait for that run to "
                "finish or choose another output directory"
            ) from None
        except OSError as err:
            raise RunDirError(f"cannot lock {run_dir / LOCK_FILE}: {err.strerror or err}") from err
        hold = _HELD[key] = _Hold(lock)
    else:
        hold.lock.acquire()
    try:
        if resume is not None and not hold.prepared:
            if not resume:
                start_over(run_dir)
            hold.prepared = True
    except OSError as err:
        _release(run_dir, hold)
        raise RunDirError(f"cannot move the earlier run in {run_dir} aside: {err}") from err
    except BaseException:
        _release(run_dir, hold)
        raise
    return hold


def _release(run_dir: Path, hold: _Hold) -> None:
    hold.lock.release()
    if not hold.lock.is_locked:
        _HELD.pop(run_dir.resolve(), None)


def check_writable(run_dir: Path) -> None:
    """Refuse an output directory that is a file, sits under a file, is not writable, or has no space left."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output directory {run_dir} is a file, not a directory")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"cannot create output directory {run_dir}: {existing} is a file")
    for target in (existing, run_dir / "checkpoints"):
        if target.exists() and not os.access(target, os.W_OK | os.X_OK):
            raise RunDirError(f"output directory {run_dir} is not writable (no write permission on {target})")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot write to output directory {run_dir}: {err.strerror or err}") from err


def start_over(run_dir: Path) -> Path | None:
    """Move an earlier run's files into `previous-<time>/` so a fresh run never mixes with them; returns it."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    found += sorted(p for pattern in RUN_FILE_PATTERNS for p in run_dir.glob(pattern))
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir / f"previous-{stamp}", 1
    while target.exists():
        target, n = run_dir / f"previous-{stamp}-{n}", n + 1
    target.mkdir()
    for path in found:
        os.replace(path, target / path.name)
    names = ", ".join(p.name for p in found)
    log_event(run_dir, f"train.resume=false: moved the earlier run's files ({names}) to {target}")
    print(f"mmalign: train.resume=false: moved the earlier run's files in {run_dir} to {target}")
    return target


def log_event(run_dir: Path, message: str) -> None:
    """Append a time-stamped line to the run's `run.log` (what happened to the run directory, and why)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(run_dir / LOG_FILE, "a") as f:
        f.write(f"{stamp}  {message}\n")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling to write `path` to; it replaces `path` only once the block finished (and synced)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary sibling directory to fill; it replaces `path` only once the block finished."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finite_json(obj: Any, what: str, **kwargs: Any) -> str:
    """`json.dumps` that names a NaN/inf metric (e.g. `after.reward`) instead of writing `NaN`."""
    bad = _non_finite(obj, "")
    if bad:
        raise NonFiniteMetricError(
            f"{what}: metric {bad[0]!r} is {bad[1]}; refusing to report a non-finite value"
        )
    return json.dumps(obj, allow_nan=False, **kwargs)


def _non_finite(obj: Any, where: str) -> tuple[str, float] | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where, obj
    items = (
        obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    )
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def write_json_atomic(path: Path, obj: Any, what: str) -> None:
    """Write a run file (summary.json, before.json) whole or not at all, refusing NaN/inf values by name."""
    text = finite_json(obj, what, indent=2)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_before(path: Path, fingerprint: Mapping[str, str]) -> tuple[dict[str, float] | None, str | None]:
    """Stored `before` metrics if `path` was computed for this fingerprint, else None and why (None if absent)."""
    if not path.exists():
        return None, None
    try:
        stored = json.loads(path.read_text())
        metrics, previous = stored["metrics"], stored.get("fingerprint") or {}
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{path} is unreadable; recomputing the starting model's metrics"
    changed = sorted(k for k in set(fingerprint) | set(previous) if fingerprint.get(k) != previous.get(k))
    if changed:
        return None, (
            f"{path} was computed for another starting point ({', '.join(changed)} changed); recomputing the "
            "starting model's metrics"
        )
    return metrics, None


def recipe_fingerprint(recipe: Mapping[str, Any], resolve: Callable[[str], str] = str) -> dict[str, str]:
    """What besides the starting weights decides the `before` metrics: the recipe's `model` section and seed,
    and its `eval` section with the content of every file or directory it names (`resolve` maps `zoo://`)."""
    model = hashlib.sha256(_canonical({"model": recipe.get("model"), "seed": recipe.get("seed")}))
    evaluation = hashlib.sha256(_canonical(recipe.get("eval")))
    for value in _strings(recipe.get("eval")):
        target = Path(resolve(value))
        if target.exists():
            evaluation.update(value.encode())
            _hash_tree(evaluation, target)
    return {"model": model.hexdigest(), "eval": evaluation.hexdigest()}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode()


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _strings(value)


def _hash_tree(h: Any, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
