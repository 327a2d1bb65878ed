"""Batch jobs behind ``forvalue score``, ``select`` and ``merge``: resumable and shardable.

Results are appended to a JSONL file one checkpoint (a chunk of training samples) at a time,
flushed and fsynced; a job killed at any point and run again skips the samples already in
its output or errors file, drops a half-written last line, and ends with the same files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from forvalue.engine import Reference, SampleError, ValuationModel, Valuator
from forvalue.engine.readers import read_samples
from forvalue.engine.samples import SampleList, where_of

MODES = ("reference", "pairwise", "self")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        if text is None:
            return cls(0, 1)
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard {text}: need 0 <= I < N")
        return cls(index, count)

    def indices(self, n: int) -> range:
        """A contiguous slice of the samples, so merged shards keep the input order."""
        return range(n * self.index // self.count, n * (self.index + 1) // self.count)


class ResultLog:
    """An append-only JSONL file of per-sample records keyed by their input ``index``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = _read_complete_lines(path)
        self._file = path.open("a", encoding="utf-8")

    def done(self) -> set[int]:
        return {record["index"] for record in self.records}

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        self._file.writelines(json.dumps(record, allow_nan=True) + "\n" for record in records)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.extend(records)

    def close(self) -> None:
        self._file.close()


def _read_complete_lines(path: Path) -> list[dict[str, Any]]:
    """Records of a previous run; a last line cut by a kill is dropped from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


@dataclass
class JobFiles:
    """Every file a job writes, derived from ``--out``."""

    out: Path

    @property
    def errors(self) -> Path:
        return self.out.with_name(self.out.stem + ".errors.jsonl")

    @property
    def reference(self) -> Path:
        return self.out.with_name(self.out.stem + ".ref.safetensors")

    @property
    def matrix(self) -> Path:
        return self.out.with_name(self.out.stem + ".npy")

    @property
    def topk(self) -> Path:
        return self.out.with_name(self.out.stem + ".topk.jsonl")


def memory_estimate(model: ValuationModel, mode: str, batch_tokens: int, n_valid: int) -> str:
    """A rough peak-memory figure printed before a job starts (weights, reference, work)."""
    weights = sum(p.numel() * p.element_size() for p in model.backbone.parameters())
    head = model.head_weight.numel() * 4
    reference = head * (2 if mode == "reference" else 0)  # the fp32 sum and its mean
    # activations of one forward batch (a few d-wide and MLP-wide buffers per token) and
    # the kernels' vocabulary-chunk budget
    from forvalue.kernels import memory_budget

    work = batch_tokens * model.hidden_size * 4 * 24 + memory_budget()
    if mode == "pairwise":
        work += head  # one G(b) at a time on the outer route
    total = weights + reference + work
    return (f"memory estimate: weights {weights / 2**20:.0f} MiB, reference {reference / 2**20:.0f} "
            f"MiB, working set {work / 2**20:.0f} MiB, total about {total / 2**30:.2f} GiB"
            + (f" (+ label-token states of {n_valid} validation samples)" if mode == "pairwise" else ""))


def run_score(valuator: Valuator, train: Sequence[dict], valid_source: str | None, files: JobFiles, *,
              mode: str, shard: Shard, checkpoint: int, top_k: int | None,
              valid_fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Value this shard's training samples, resuming from ``files`` if they exist."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    if mode != "self" and valid_source is None:
        raise ValueError(f"--mode {mode} needs --valid")
    if top_k is not None and mode != "pairwise":
        raise ValueError("--top-k needs --mode pairwise (it ranks training samples per validation sample)")
    valid = _load_valid(valuator, valid_source, mode, files, valid_fields)
    results, errors = ResultLog(files.out), ResultLog(files.errors)
    try:
        todo = [i for i in shard.indices(len(train)) if i not in results.done() | errors.done()]
        with tqdm(total=len(shard.indices(len(train))), initial=len(shard.indices(len(train))) - len(todo),
                  desc=f"{mode} values", unit="sample") as bar:
            for chunk in _chunks(todo, checkpoint):
                records, failures = _value_chunk(valuator, train, chunk, valid, mode)
                errors.append(failures)
                results.append(records)
                bar.update(len(chunk))
    finally:
        results.close()
        errors.close()
    summary = {"mode": mode, "scored": len(results.records), "errors": len(errors.records),
               "out": str(files.out), "errors_file": str(files.errors)}
    if mode == "pairwise":
        summary.update(_write_matrix(results.records, files, valid, train, top_k))
    return summary


def _load_valid(valuator: Valuator, source: str | None, mode: str, files: JobFiles,
                fields: dict[str, str] | None) -> Any:
    """The validation side: samples (pairwise) or a Reference built once and saved."""
    if mode == "self":
        return None
    if source is not None and source.endswith(".safetensors"):
        if mode != "reference":
            raise ValueError("a saved Reference only serves --mode reference; give samples for pairwise")
        return Reference.load(source)
    samples = read_samples(source, fields=fields)
    if mode == "pairwise":
        return samples
    if files.reference.exists():
        return Reference.load(files.reference)
    reference, failures = valuator.reference(samples, errors="collect")
    for error in failures:
        tqdm.write(f"forvalue: skipped validation {error}")
    reference.save(files.reference)
    return reference


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _value_chunk(valuator: Valuator, train: Sequence[dict], chunk: list[int], valid: Any,
                 mode: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    samples = _subset(train, chunk)
    if mode == "reference":
        values, failures = valuator.score(samples, valid, errors="collect")
    elif mode == "self":
        values, failures = valuator.self_value(samples, errors="collect")
    else:
        values, failures = valuator.pairwise(samples, valid, errors="collect")
    failed = _failed_positions(samples, failures)
    records, error_records = [], []
    for position, index in enumerate(chunk):
        sample_id = _sample_id(train[index], index)
        if position in failed:
            error_records.append({"id": sample_id, "index": index, "error": str(failed[position])})
        elif mode == "pairwise":
            records.append({"id": sample_id, "index": index, "values": values[position].tolist()})
        else:
            records.append({"id": sample_id, "index": index, "value": float(values[position])})
    return records, error_records


def _subset(samples: Sequence[dict], indices: list[int]) -> Sequence[dict]:
    """The chunk's samples, keeping their file and line for error messages."""
    if isinstance(samples, SampleList) and samples.lines:
        return SampleList([samples[i] for i in indices], source=samples.source,
                          lines=[samples.lines[i] for i in indices], unit=samples.unit)
    return SampleList([samples[i] for i in indices], source="input", lines=indices, unit="sample")


def _failed_positions(samples: Sequence[dict], failures: list[SampleError]) -> dict[int, SampleError]:
    """Map each error to its sample's position in the chunk (validation errors stay out)."""
    by_where = {where_of(samples, i): i for i in range(len(samples))}
    return {by_where[e.where]: e for e in failures if e.where in by_where}


def _sample_id(sample: Any, index: int) -> str:
    return str(sample["id"]) if isinstance(sample, dict) and "id" in sample else str(index)


def _write_matrix(records: list[dict[str, Any]], files: JobFiles, valid: Sequence[dict],
                  train: Sequence[dict], top_k: int | None) -> dict[str, Any]:
    ordered = sorted(records, key=lambda r: r["index"])
    matrix = np.array([r["values"] for r in ordered], dtype=np.float64).reshape(len(ordered), len(valid))
    np.save(files.matrix, matrix)
    written = {"matrix": str(files.matrix)}
    if top_k is not None:
        _write_topk(files.topk, matrix, [r["id"] for r in ordered], valid, top_k)
        written["topk"] = str(files.topk)
    return written


def _write_topk(path: Path, matrix: np.ndarray, train_ids: list[str], valid: Sequence[dict],
                k: int) -> None:
    """Per validation sample, its k most and k least valuable training samples."""
    lines = []
    for j, sample in enumerate(valid):
        column = matrix[:, j]
        order = [i for i in np.argsort(-column, kind="stable") if np.isfinite(column[i])]
        ranked = [{"id": train_ids[i], "value": float(column[i])} for i in order]
        lines.append({"valid_id": _sample_id(sample, j), "most": ranked[:k],
                      "least": ranked[::-1][:k]})
    _write_jsonl_atomic(path, lines)


def _write_jsonl_atomic(path: Path, records: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def merge_shards(parts: Sequence[str], out: Path) -> dict[str, Any]:
    """Join shard outputs (and their errors files) into one, in input order, checking that
    no sample appears twice."""
    merged: dict[str, list[dict[str, Any]]] = {"results": [], "errors": []}
    for part in parts:
        files = JobFiles(Path(part))
        if not files.out.exists():
            raise FileNotFoundError(f"no such shard output: {part}")
        merged["results"] += _read_complete_lines(files.out)
        merged["errors"] += _read_complete_lines(files.errors)
    seen: set[int] = set()
    for record in merged["results"] + merged["errors"]:
        if record["index"] in seen:
            raise ValueError(f"sample index {record['index']} appears in more than one shard")
        seen.add(record["index"])
    target = JobFiles(out)
    results = sorted(merged["results"], key=lambda r: r["index"])
    _write_jsonl_atomic(target.out, results)
    _write_jsonl_atomic(target.errors, sorted(merged["errors"], key=lambda r: r["index"]))
    if results and "values" in results[0]:
        np.save(target.matrix, np.array([r["values"] for r in results], dtype=np.float64))
    return {"merged": len(results), "errors": len(merged["errors"]), "out": str(out)}


def select_top(train: Sequence[dict], records: list[dict[str, Any]], ratio: float,
               out: Path) -> dict[str, Any]:
    """Write the top ``ceil(ratio n)`` training samples by value to ``out``, as given."""
    if not 0 < ratio <= 1:
        raise ValueError(f"--ratio must lie in (0, 1], got {ratio}")
    valued = [r for r in records if math.isfinite(r["value"])]
    keep = math.ceil(ratio * len(valued))
    chosen = sorted(valued, key=lambda r: -r["value"])[:keep]
    _write_jsonl_atomic(out, [train[r["index"]] for r in sorted(chosen, key=lambda r: r["index"])])
    summary: dict[str, Any] = {"valued": len(valued), "selected": keep, "out": str(out)}
    if chosen:
        summary["threshold"] = chosen[-1]["value"]
        summary["mean_selected"] = float(np.mean([r["value"] for r in chosen]))
        summary["mean_all"] = float(np.mean([r["value"] for r in valued]))
    clean = [_clean_label(train[r["index"]]) for r in chosen]
    if chosen and all(c is not None for c in clean):
        summary["selected_clean_ratio"] = float(np.mean(clean))
    return summary


def _clean_label(sample: Any) -> int | None:
    meta = sample.get("meta") if isinstance(sample, dict) else None
    return meta.get("clean_label") if isinstance(meta, dict) else None
