"""The project's one user-error type, and how a command line reports it.

A :class:`UserError` is a problem with what the user asked for (a bad flag value, a missing file,
an output folder holding another run): every command prints it as one line on stderr and exits 2,
having written nothing half-done. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


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


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``. A process of a multi-process launch (``WORLD_SIZE`` above 1) skips interpreter
    finalization: it flushes its logs and output, then leaves with :func:`os._exit`.

    ``destroy_process_group`` does not stop torch's gloo worker threads, and they can still hold tensors. A worker
    that drops the last reference to one while CPython finalizes must take the GIL; CPython ends such a thread with
    ``pthread_exit``, and the process aborts with "terminate called without an active exception" (SIGABRT) after
    all its work was saved. CI saw this twice at the end of a training launch; a script that leaves 100 async gloo
    all-reduces behind aborted 10 of 12 launches with a plain exit. Skipping finalization loses nothing: the caller
    has saved its work and destroyed its process group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
