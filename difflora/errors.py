"""User-facing errors: one clear line, exit code 2, no traceback.

Library code raises :class:`UserError` for mistakes the user can fix (a missing folder, a bad
flag). Entry points wrap their work in :func:`exit_on_user_error`, which prints the message and
exits with status 2. Anything else is a bug and keeps its traceback.

Exit codes: 0 done; 2 bad input (nothing trained, or training stopped with the reason named);
3 training finished and its files are written, but ``--push_to_hub`` failed; 130 interrupted;
141 the output pipe closed (``... | head``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
EXIT_PUSH_FAILED = 3


class UserError(Exception):
    """A mistake in the user's input. The message names the problem and the fix."""

    exit_code = EXIT_USER_ERROR


class PushFailed(UserError):
    """The run's files are written but the upload to the hub failed: a distinct exit code (3), so a
    script can tell "retry the upload" from "fix the input"."""

    exit_code = EXIT_PUSH_FAILED


def exit_on_user_error(fn: Callable[[], T], prog: str = "difflora") -> T:
    """Run ``fn``; on :class:`UserError` print ``prog: error: <message>`` and exit 2 (3 for :class:`PushFailed`)."""
    try:
        return fn()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # The reader went away (``difflora dreambooth --help | head``): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None


def import_job(name: str) -> Any:
    """Import a job's module (torch, diffusers) with Ctrl-C held back until the import is done.

    A SIGINT that lands while torch's C extensions initialise can abort the process (SIGABRT, or
    an exit by the signal) instead of raising KeyboardInterrupt. Blocked here, the signal stays
    pending and is delivered the moment the import ends, as an ordinary KeyboardInterrupt that
    :func:`exit_on_user_error` turns into "interrupted", exit 130.
    """
    import importlib
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return importlib.import_module(name)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return importlib.import_module(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

