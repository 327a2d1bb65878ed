"""Read samples from JSONL files, parquet files and saved Hugging Face datasets.

JSONL lines are taken as they are (an unknown key is an error, so typos surface). Tabular
sources carry columns of their own: the columns named by ``fields`` (or already named like a
sample key) become the sample, every other column goes under ``"meta"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .samples import FORMS, OPTIONAL_KEYS, SampleError, SampleList

SAMPLE_KEYS = frozenset().union(*FORMS.values()) | OPTIONAL_KEYS


def read_samples(path: str | os.PathLike, *, fields: Mapping[str, str] | None = None,
                 split: str | None = None) -> SampleList:
    """Samples from a ``.jsonl`` file, a ``.parquet`` file or a ``datasets.save_to_disk`` folder.

    ``fields`` maps sample keys to source columns, e.g. ``{"prompt": "Question",
    "response": "Answer"}``; ``split`` picks one split of a saved DatasetDict.
    """
    path = Path(path)
    fields = dict(fields or {})
    check_fields(fields)
    if path.is_dir():
        rows = _dataset_rows(path, split)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif not path.exists():
        raise FileNotFoundError(f"no such samples file: {path}")
    else:
        samples = read_jsonl(path)
        return _mapped(samples, fields) if fields else samples
    table = SampleList(rows, source=str(path), lines=range(len(rows)), unit="row")
    return _mapped(table, fields)


def check_fields(fields: Mapping[str, str]) -> None:
    """Refuse a mapping onto something that is not a sample key."""
    unknown = sorted(set(fields) - SAMPLE_KEYS)
    if unknown:
        raise ValueError(f"cannot map onto {unknown}: sample keys are {sorted(SAMPLE_KEYS)}")


def _mapped(rows: SampleList, fields: Mapping[str, str]) -> SampleList:
    samples = [map_row(dict(row), fields, rows.where(i)) for i, row in enumerate(rows)]
    return SampleList(samples, source=rows.source, lines=rows.lines, unit=rows.unit)


def map_row(row: dict[str, Any], fields: Mapping[str, str], where: str) -> dict[str, Any]:
    """The sample of one row (a JSON object or a table row; ``row`` is consumed): mapped and
    sample-named columns become the sample, the others go under "meta". Shared with the Ray job."""
    sample: dict[str, Any] = {}
    for key, column in fields.items():
        if column not in row:
            raise SampleError(f"has no column {column!r} (mapped to {key!r}); columns: {sorted(row)}",
                              sample_id=None, where=where)
        sample[key] = row.pop(column)
    for key in list(row):
        if key in SAMPLE_KEYS and key not in sample and key not in fields.values():
            sample[key] = row.pop(key)
    meta = row.pop("meta", None)
    if row or meta is not None:
        sample["meta"] = {**row, **({"meta": meta} if meta is not None else {})}
    return sample


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow: pip install 'forvalue[data]'") from None
    return pq.read_table(path).to_pylist()


def _dataset_rows(path: Path, split: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ValueError("reading a saved dataset needs datasets: pip install 'forvalue[data]'") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ValueError(f"{path} is not a saved Hugging Face dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{path} holds splits {list(loaded)}: choose one with split=")
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r}; splits: {list(loaded)}")
        loaded = loaded[split]
    return list(loaded)


def read_jsonl(path: str | os.PathLike[str]) -> SampleList:
    """One JSON object per line; blank lines are skipped but still counted."""
    source = os.fspath(path)
    try:
        file = open(source, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"sample file not found: {source}") from None
    samples, lines = [], []
    with file:
        for number, raw in enumerate(file, start=1):
            sample = parse_line(raw, where=f"{source} line {number}")
            if sample is not None:
                samples.append(sample)
                lines.append(number)
    return SampleList(samples, source=source, lines=lines)


def parse_line(raw: bytes, *, where: str) -> dict[str, Any] | None:
    """One JSONL line as a sample dict (None for a blank line); raises SampleError."""
    try:
        # lstrip: a byte-order mark left by some editors is not part of the JSON.
        text = raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as error:
        raise SampleError(f"not valid UTF-8 ({error.reason})", sample_id=None, where=where) from None
    if not text:
        return None
    try:
        sample = json.loads(text)
    except json.JSONDecodeError as error:
        message = f"not valid JSON: {error.msg} at column {error.colno}"
        raise SampleError(message, sample_id=None, where=where) from None
    if not isinstance(sample, dict):
        message = f"expected a JSON object (one sample per line), got {type(sample).__name__}"
        raise SampleError(message, sample_id=None, where=where)
    return sample
