"""One logger for the package, rendered by rich, and progress bars that can be switched off.

Progress bars are off when stderr is not a terminal (containers, SLURM logs) or when
``DUALGLOW_NO_PROGRESS=1``; long loops call :func:`progress` and never check this themselves.
"""

from __future__ import annotations

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
    console = RichHandler(
        console=Console(stderr=True), show_path=verbosity > 0, rich_tracebacks=verbosity > 0, markup=False
    )
    console.setLevel(level)
    logger.addHandler(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(logging.DEBUG)
        logger.addHandler(file_handler)
    logger.propagate = False


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
