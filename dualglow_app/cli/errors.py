"""The one error boundary of every entry point (``dualglow``, ``dualglow-evaluate``, ``dualglow-phantom``).

Each command is a :class:`GuardedCommand`: its callback runs with SIGTERM and SIGINT turned
into :class:`Interrupted`, and whatever escapes it reaches the user as one line on stderr
(``Error: ...``, as click prints usage errors; the log file also gets it, with the traceback):

- a usage problem (click's own, or an options/input error the command raises as one, such as
  an OUTPUT_DIR or work dir that cannot be written, :func:`check_writable_folders`): exit 2;
- an ``OSError`` on a path (an output or work folder that cannot be written, a full disk):
  the path and the fix (:func:`dualglow_app.log.describe_error`), exit 2;
- SIGTERM (``kill``, ``docker stop``, a SLURM time limit) or SIGINT (Ctrl-C): the stack unwinds,
  so every atomic write removes its temporary and nothing is left half-way; one line says what
  was interrupted and how to resume; exit 128 + the signal (143, 130);
- anything else: the error's first line, exit 1.

Tracebacks reach the console only with ``-v``. Failures of single subjects never get here: the stages
catch them, go on with the others and exit 1 at the end.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from dualglow_app.io import writable_dir
from dualglow_app.log import describe_error, get_logger
from dualglow_app.runtime import in_container

log = get_logger(__name__)

#: Exit status of usage problems (click's) and of folders that cannot be written.
USAGE_EXIT = 2


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; a KeyboardInterrupt, so ``except Exception`` never swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread.

    Python's default SIGTERM handling exits without unwinding, so the temporaries of atomic
    writes would be left behind; an exception runs their clean-up. The previous handlers are
    restored afterwards (elsewhere than the main thread, nothing changes).
    """

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    handled = (signal.SIGTERM, signal.SIGINT)
    try:
        previous = {signum: signal.signal(signum, interrupt) for signum in handled}
    except ValueError:  # not the main thread: leave signal handling alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interruption_message(err: KeyboardInterrupt, resume: str) -> str:
    """'interrupted by SIGTERM during sub-02, after 1 of 3 scan(s): ...; <resume>'."""
    name = signal.Signals(getattr(err, "signum", signal.SIGINT)).name
    where = "; ".join(getattr(err, "__notes__", []))
    return (f"interrupted by {name}" + (f" {where}" if where else "")
            + f": no half-written file was kept; {resume}")  # fmt: skip


def check_writable_folders(output_dir: Path, work_dir: Path | None) -> None:
    """A usage error (exit 2), with a hint that fits the environment, when OUTPUT_DIR or the
    work dir given with ``-w`` cannot be written: said before any work, not as a traceback."""
    for folder, what in ((output_dir, "OUTPUT_DIR"), (work_dir, "-w/--work-dir")):
        if folder is None or writable_dir(folder):
            continue
        hint = {
            "docker": " Inside Docker, mount a writable host folder: -v /host/path:/path (without :ro).",
            "apptainer": " Inside Apptainer, bind a writable host folder: -B /host/path:/path.",
        }.get(in_container() or "", "")
        raise click.UsageError(f"{what} {folder} cannot be written: make it writable, or choose another folder.{hint}")


class GuardedCommand(click.Command):
    """A click command run inside the error boundary (see the module docstring).

    ``resume_hint(params)`` says, from the command's parameters, how to continue after an
    interruption (e.g. "rerun the same command: finished scans are skipped").
    """

    def __init__(self, *args: Any, resume_hint: Callable[[dict[str, Any]], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_hint = resume_hint or (lambda params: "rerun the same command to continue")

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with signals_as_interrupts():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            _fail(ctx, interruption_message(err, self.resume_hint(ctx.params)), 128 + signum)
        except OSError as err:
            if err.filename is None:  # e.g. ConnectionError: not a path the user can fix
                _fail(ctx, f"{type(err).__name__}: {describe_error(err)}", 1, offer_traceback=True)
            _fail(ctx, describe_error(err), USAGE_EXIT)
        except Exception as err:  # noqa: BLE001 - the boundary: one line, not a traceback
            _fail(ctx, f"{type(err).__name__}: {describe_error(err)}", 1, offer_traceback=True)


class RunError(click.ClickException):
    """What the boundary tells the user: click prints ``Error: <message>`` (one line, never
    wrapped) on stderr and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares a class default


def _fail(ctx: click.Context, message: str, code: int, offer_traceback: bool = False) -> NoReturn:
    """Exit with ``code`` and ``message``; the traceback goes to the log (its file, and the
    console under -v)."""
    verbose = int(ctx.params.get("verbose") or 0) > 0
    log.debug("%s", message, exc_info=True)
    hint = " (rerun with -v for the traceback)" if offer_traceback and not verbose else ""
    raise RunError(message + hint, code)


__all__ = [
    "GuardedCommand", "Interrupted", "RunError", "USAGE_EXIT", "check_writable_folders", "interruption_message",
    "signals_as_interrupts",
]
