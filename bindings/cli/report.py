"""How the commands speak to the user: a user mistake in one line, a summary as ``key: value``.

Shared by the ``forvalue`` CLI and ``forvalue serve`` (which reports errors of its own while
it runs), so that neither imports the other.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

# SampleError, ModelError and ReferenceMismatch are ValueErrors; so are bad option values.
USER_ERRORS = (ValueError, OSError)
EXIT_USER_ERROR = 2


def user_error(error: object) -> int:
    """Report a user mistake in one line (no stack trace); returns the exit status."""
    print(f"forvalue: error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def print_summary(summary: Mapping[str, Any]) -> None:
    for key, value in summary.items():
        print(f"{key}: {value}")
