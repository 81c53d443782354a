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
from typing import TypeVar

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
