"""The resumable output of ``forvalue score``, ``select`` and ``stream``: two append-only JSONL
files, ``OUT`` (one record per valued sample) and ``OUT.errors.jsonl`` (one per failed sample).

Records are appended as they are made and fsynced at each ``sync()`` (and, with
``sync_seconds``, at least that often), so a job killed at any point loses at most the unsynced
tail. Opening the files again reads what a previous run wrote and drops a last line cut by the
kill, so a rerun skips exactly the samples already done and ends with the same files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from forvalue.engine.atomic import write_atomically


def errors_path(out: Path) -> Path:
    """Where the per-sample errors of ``out`` go."""
    return out.with_name(out.stem + ".errors.jsonl")


class ResultLog:
    """``out`` and its errors file; ``records[failed]`` holds every record of either, old and new."""

    def __init__(self, out: Path, *, sync_seconds: float | None = None) -> None:
        self.paths = (Path(out), errors_path(Path(out)))
        self.records = tuple(read_complete_lines(path) for path in self.paths)
        self.sync_seconds = sync_seconds  # None: only when sync() is called
        self._files = tuple(path.open("a", encoding="utf-8") for path in self.paths)
        self._unsynced: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        self._synced_at = time.monotonic()

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.records[False]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.records[True]

    def done(self, key: str) -> set[Any]:
        """The ``key`` ("index" or "id") of every sample valued or failed so far."""
        return {record[key] for records in self.records for record in records}

    def add(self, records: Iterable[dict[str, Any]], *, failed: bool) -> None:
        """Append records (of failed samples to the errors file); written at the next sync."""
        self._unsynced[failed].extend(records)
        if self.sync_seconds is not None and time.monotonic() - self._synced_at >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Write and fsync what was added."""
        for failed in (True, False):
            records, file = self._unsynced[failed], self._files[failed]
            if records:
                file.writelines(json.dumps(record, allow_nan=True) + "\n" for record in records)
                file.flush()
                os.fsync(file.fileno())
                self.records[failed].extend(records)
                records.clear()
        self._synced_at = time.monotonic()

    def close(self) -> None:
        self.sync()
        for file in self._files:
            file.close()

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def read_complete_lines(path: Path) -> list[dict[str, Any]]:
    """Records of a previous run; a last line cut by a kill is dropped from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def write_jsonl_atomic(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write all of ``records`` or nothing."""
    lines = [json.dumps(record, allow_nan=True) + "\n" for record in records]
    write_atomically(path, lambda file: file.writelines(lines))
