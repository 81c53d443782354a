"""User-facing errors: one clear line, exit code 2, no traceback.

Library code raises :class:`UserError` for mistakes the user can fix (a missing folder, a bad
flag). Entry points wrap their work in :func:`exit_on_user_error`, which prints the message and
exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input. The message names the problem and the fix."""


def exit_on_user_error(fn: Callable[[], T], prog: str = "difflora") -> T:
    """Run ``fn``; on :class:`UserError` print ``prog: error: <message>`` and exit 2."""
    try:
        return fn()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
