"""The project's one user-error type, and how a command line reports it.

A :class:`UserError` is a problem with what the user asked for (a bad flag value, a missing file,
an output folder holding another run): every command prints it as one line on stderr and exits 2,
having written nothing half-done. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


class BackendLoadError(UserError):
    """A model backend could not be started (no such model folder, a missing extra, a bad URL)."""


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body; a :class:`UserError` becomes ``prog: error: ...`` and exit 2."""
    try:
        return int(body() or 0)
    except UserError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        # One write: the lines of processes launched together (accelerate launch) then never interleave
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2
