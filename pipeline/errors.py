"""Errors of the pipeline's commands, each carrying its exit code as its type, and the one
`main` wrapper every command runs under (`run_main`).

Exit codes of every command: 0 clean; 1 complete, but some inputs have issues (decided by a
job's report, never by an exception); 2 usage or configuration error (`UsageError` and the
types mapped to it below); 3 incomplete, rerun to resume (`IncompleteError`); 130 Ctrl-C
outside a job's run (inside one, the job reports what it finished and exits 3).

Errors of modules that cannot know this package (the codec's `ConfigError`, the registry's,
the sources', the lease's) are mapped to a code by their type in `exit_code_of`; nothing is
ever decided from an error's text.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

EXIT_OK, EXIT_ISSUES, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C before or after a job's run (the shell's 128 + SIGINT)


class PipelineError(Exception):
    """An error of this package's commands; `exit_code` is what the command exits with and
    `hint` is appended to its one-line message."""

    exit_code = EXIT_USAGE
    hint = ""


class UsageError(PipelineError):
    """Bad arguments, configuration or input: nothing was done (exit 2)."""

    exit_code = EXIT_USAGE


class IncompleteError(PipelineError):
    """The work stopped before it was complete; what was finished is kept (exit 3)."""

    exit_code = EXIT_INCOMPLETE
    hint = "completed work is kept; rerun to resume"


class JobError(IncompleteError):
    """The job cannot go on (e.g. its workers cannot start); completed items are kept."""


def _foreign_codes() -> list[tuple[type, int, str]]:
    """(type, exit code, hint) for errors of modules that do not import this one; the most
    specific type first (a subclass before its base)."""
    from m2t_core.config import ConfigError
    from m2t_core.registry import CheckpointError, ModelNotFoundError

    from pipeline.storage.lease import LeaseError, LeaseHeldError, LeaseLostError
    from pipeline.storage.sources import SourceError

    return [
        (LeaseLostError, EXIT_INCOMPLETE, "this job stopped writing; its completed shards are kept"),
        (LeaseHeldError, EXIT_USAGE, ""),
        (LeaseError, EXIT_USAGE, ""),  # e.g. an unreadable lease file
        (ConfigError, EXIT_USAGE, ""),
        (SourceError, EXIT_USAGE, ""),
        (ModelNotFoundError, EXIT_USAGE, ""),
        (CheckpointError, EXIT_USAGE, ""),
        (FileNotFoundError, EXIT_USAGE, ""),
    ]


def _classify(exc: BaseException) -> tuple[int, str, bool]:
    """(exit code, hint, known) of an exception, by its type."""
    if isinstance(exc, PipelineError):
        return exc.exit_code, exc.hint, True
    for cls, code, hint in _foreign_codes():
        if isinstance(exc, cls):
            return code, hint, True
    return EXIT_USAGE, "", False  # anything else: one line and 2, like the codec's commands


def exit_code_of(exc: BaseException) -> int:
    """The exit code an error means, by its type."""
    return _classify(exc)[0]


def describe(exc: BaseException) -> str:
    """The one line a command prints for an error: its message, plus its hint; an error of an
    unexpected type also names the type."""
    _, hint, known = _classify(exc)
    text = str(exc) or type(exc).__name__
    if not known:
        text = f"{type(exc).__name__}: {text}"
    return f"{text} ({hint})" if hint else text


def run_main(prog: str, body: Callable[[], int], *, logs: bool = False) -> int:
    """Run a command's body under the one error policy of the pipeline's commands: an error
    prints `PROG: error: ...` (PROG: "m2t compress", ...) on stderr and returns its type's exit
    code (M2T_DEBUG=1 shows the traceback instead); Ctrl-C returns 130. `logs`: log INFO to
    stderr unless the program already set up logging (the jobs log their progress)."""
    if logs and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("M2T_DEBUG"):
            raise
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        return exit_code_of(exc)
