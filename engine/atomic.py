"""Files written whole or not at all: a temporary file beside the target, fsynced, then renamed
over it, so that a reader (or a rerun after a kill) never sees half a file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the whole content to the temporary path ``tmp``; it then replaces
    ``path``. On an error the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        with tmp.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, write: Callable[[IO[Any]], None], *,
                     binary: bool = False) -> None:
    """``write(file)`` fills an open (text, UTF-8, or binary) file that then replaces ``path``."""

    def fill(tmp: Path) -> None:
        with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8") as file:
            write(file)

    replace_atomically(path, fill)
