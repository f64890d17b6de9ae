"""One logger for the package, rendered by rich, and progress bars that can be switched off.

Progress bars are off when stderr is not a terminal (containers, SLURM logs) or when
``DUALGLOW_NO_PROGRESS=1``; long loops call :func:`progress` and never check this themselves.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

LOGGER_NAME = "dualglow"
T = TypeVar("T")


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger, or a child of it (``get_logger(__name__)`` in a module)."""
    if name is None or name == LOGGER_NAME:
        return logging.getLogger(LOGGER_NAME)
    short = name.removeprefix("dualglow_app.")
    return logging.getLogger(f"{LOGGER_NAME}.{short}")


def setup_logging(verbosity: int = 0, log_file: os.PathLike[str] | str | None = None) -> None:
    """Attach a rich console handler (and optionally a plain file handler) to the logger.

    verbosity: 0 -> INFO, 1 or more -> DEBUG; negative -> WARNING.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING
    logger = get_logger()
    logger.setLevel(level)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    # Logs go to stderr: stdout is for results (final summaries, piped output, doctests).
    # Rich formats for a terminal; redirected (containers, SLURM, nohup) it would wrap every
    # line at 80 columns and split paths, so a log file gets one plain line per message.
    stderr = Console(stderr=True)
    console: logging.Handler
    if stderr.is_terminal:
        console = RichHandler(console=stderr, show_path=verbosity > 0, rich_tracebacks=verbosity > 0, markup=False)
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    console.setLevel(level)
    logger.addHandler(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(logging.DEBUG)
        logger.addHandler(file_handler)
    logger.propagate = False


#: The fix for an OSError on a path, by errno.
_PATH_FIXES = {
    errno.EACCES: "make it writable for this user, or choose another folder",
    errno.EPERM: "make it writable for this user, or choose another folder",
    errno.EROFS: "it is on a read-only file system: choose a writable folder",
    errno.ENOSPC: "the disk is full: free space, or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is full: free space, or choose a folder on another disk",
    errno.ENOTDIR: "a file is in the way of a folder on that path: move it, or choose another path",
    errno.EISDIR: "a folder is in the way of a file on that path: move it, or choose another path",
    errno.ENOENT: "a folder on that path vanished or was never there: check the path",
}
_MOUNT_HINTS = {
    "docker": " (inside Docker: mount a writable host folder, docker run -v /host/folder:/folder, without :ro)",
    "apptainer": " (inside Apptainer: bind a writable host folder, apptainer run -B /host/folder:/folder)",
}


def describe_error(err: BaseException) -> str:
    """An error as one line: an ``OSError`` on a path as 'PATH: reason; the fix', anything
    else as the first line of its message (its type when the message is empty).

    >>> describe_error(OSError(28, "No space left on device", "/out/sub-01"))
    '/out/sub-01: No space left on device; the disk is full: free space, or choose a folder on another disk'
    """
    if isinstance(err, OSError) and err.filename is not None:
        from dualglow_app.runtime import in_container

        fix = _PATH_FIXES.get(err.errno or 0, "check the path and its permissions")
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix += _MOUNT_HINTS.get(in_container() or "", "")
        return f"{err.filename}: {err.strerror or type(err).__name__}; {fix}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` on Python 3.10 too: context for whoever reports the error (the CLI
    boundary says where an interruption stopped from these notes)."""
    notes = getattr(err, "__notes__", None)
    if notes is None:
        notes = []
        err.__notes__ = notes  # type: ignore[attr-defined]
    notes.append(note)


def progress_enabled() -> bool:
    """Whether progress bars should be drawn (a terminal, and not switched off)."""
    if os.environ.get("DUALGLOW_NO_PROGRESS", "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a rich progress bar when :func:`progress_enabled`."""
    if not progress_enabled():
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, total=total, transient=True)
