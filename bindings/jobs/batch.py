"""Batch jobs behind ``forvalue score`` and ``select``: resumable and shardable.

Results go to a ResultLog one checkpoint (a chunk of training samples) at a time, flushed and
fsynced; a job killed at any point and run again skips the samples already in its output or
errors file, drops a half-written last line, and ends with the same files. ``--shard I/N``
values one contiguous slice (``shards.py``, where ``forvalue merge`` joins them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from forvalue.engine import Reference, SampleError, ValuationModel, Valuator
from forvalue.engine.inputs.readers import read_samples
from forvalue.engine.inputs.samples import sample_id_of, subset_of
from forvalue.engine.valuation.ranking import round_robin

from .result_log import ResultLog, write_jsonl_atomic
from .shards import JobFiles, Shard

MODES = ("reference", "pairwise", "self")


@dataclass(frozen=True)
class PairwiseValid:
    """The validation samples of a pairwise job. Only the ``usable`` ones are valued; the others
    were reported once and keep NaN columns, so every error of a chunk is a training sample's."""

    samples: Sequence[dict]
    usable: list[int]


def memory_estimate(model: ValuationModel, mode: str, batch_tokens: int, n_valid: int) -> str:
    """A rough peak-memory figure printed before a job starts (weights, reference, work)."""
    # the vLLM backbone's weights live in its own process: here only the head
    weights = (model.head_weight.numel() * model.head_weight.element_size() if model.backbone is None
               else sum(p.numel() * p.element_size() for p in model.backbone.parameters()))
    if model.skip is not None:  # the skip readout's head [W, 0] is a copy of its own
        weights += model.head_weight.numel() * model.head_weight.element_size()
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
    shard_size = len(shard.indices(len(train)))
    with ResultLog(files.out) as log:
        todo = [i for i in shard.indices(len(train)) if i not in log.done("index")]
        with tqdm(total=shard_size, initial=shard_size - len(todo), desc=f"{mode} values",
                  unit="sample") as bar:
            for chunk in _chunks(todo, checkpoint):
                records, failures = _value_chunk(valuator, train, chunk, valid, mode)
                log.add(failures, failed=True)
                log.add(records, failed=False)
                log.sync()
                bar.update(len(chunk))
    summary = {"mode": mode, "scored": len(log.results), "errors": len(log.errors),
               "out": str(files.out), "errors_file": str(files.errors)}
    if mode == "pairwise":
        summary.update(_write_matrix(log.results, files, valid.samples, top_k))
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
        _, failures = valuator.label_states(samples, errors="collect")  # one forward pass each
        _report_skipped(failures)
        bad = {error.index for error in failures}
        return PairwiseValid(samples, [j for j in range(len(samples)) if j not in bad])
    if files.reference.exists():
        return Reference.load(files.reference)
    reference, failures = valuator.reference(samples, errors="collect")
    _report_skipped(failures)
    reference.save(files.reference)
    return reference


def _report_skipped(failures: list[SampleError]) -> None:
    for error in failures:
        tqdm.write(f"forvalue: skipped validation {error}")


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _value_chunk(valuator: Valuator, train: Sequence[dict], chunk: list[int], valid: Any,
                 mode: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    samples = subset_of(train, chunk)
    if mode == "reference":
        values, failures = valuator.score(samples, valid, errors="collect")
    elif mode == "self":
        values, failures = valuator.self_value(samples, errors="collect")
    else:
        values = np.full((len(chunk), len(valid.samples)), np.nan)
        valid_samples = subset_of(valid.samples, valid.usable)
        usable, failures = valuator.pairwise(samples, valid_samples, errors="collect")
        values[:, valid.usable] = usable
    failed = _failed_positions(failures)
    records, error_records = [], []
    for position, index in enumerate(chunk):
        sample_id = sample_id_of(train[index], str(index))
        if position in failed:
            error_records.append({"id": sample_id, "index": index, "error": str(failed[position])})
        elif mode == "pairwise":
            records.append({"id": sample_id, "index": index, "values": values[position].tolist()})
        else:
            records.append({"id": sample_id, "index": index, "value": float(values[position])})
    return records, error_records


def _failed_positions(failures: list[SampleError]) -> dict[int, SampleError]:
    """Each error by its sample's position in the chunk (``index``, set by the engine)."""
    unplaced = [error for error in failures if error.index is None]
    if unplaced:  # a bug: the error could not be kept apart from the values
        raise RuntimeError(f"the engine reported an error without its sample's index: {unplaced[0]}")
    return {error.index: error for error in failures}


def _write_matrix(records: list[dict[str, Any]], files: JobFiles, valid: Sequence[dict],
                  top_k: int | None) -> dict[str, Any]:
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
        lines.append({"valid_id": sample_id_of(sample, str(j)), "most": ranked[:k],
                      "least": ranked[::-1][:k]})
    write_jsonl_atomic(path, lines)


STRATEGIES = ("top", "round-robin")


def select_top(train: Sequence[dict], records: list[dict[str, Any]], ratio: float, out: Path,
               strategy: str = "top", pool_size: int | None = None) -> dict[str, Any]:
    """Write ``ceil(ratio n)`` training samples to ``out``, as given, in input order: those
    of highest value (``top``; records of the reference mode), or those the validation
    samples take in turn (``round-robin``, engine/valuation/ranking.py; records of the pairwise
    mode). ``pool_size``: the ``n`` when ``records`` are only the candidates (an index's
    shortlist); by default the records with a value."""
    if not 0 < ratio <= 1:
        raise ValueError(f"--ratio must lie in (0, 1], got {ratio}")
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    valued = [r for r in records if math.isfinite(_mean_value(r))]
    keep = min(len(valued), math.ceil(ratio * (len(valued) if pool_size is None else pool_size)))
    if strategy == "top":
        chosen = sorted(valued, key=lambda r: -r["value"])[:keep]
    else:
        matrix = np.array([r["values"] for r in valued], dtype=np.float64).reshape(len(valued), -1)
        chosen = [valued[i] for i in round_robin(matrix, keep)]
    write_jsonl_atomic(out, [train[r["index"]] for r in sorted(chosen, key=lambda r: r["index"])])
    summary: dict[str, Any] = {"strategy": strategy, "valued": len(valued), "selected": keep, "out": str(out)}
    if chosen:
        if strategy == "top":
            summary["threshold"] = chosen[-1]["value"]
        summary["mean_selected"] = float(np.mean([_mean_value(r) for r in chosen]))
        summary["mean_all"] = float(np.mean([_mean_value(r) for r in valued]))
    clean = [_clean_label(train[r["index"]]) for r in chosen]
    if chosen and all(c is not None for c in clean):
        summary["selected_clean_ratio"] = float(np.mean(clean))
    return summary


def _mean_value(record: dict[str, Any]) -> float:
    """A record's value against the validation set (pairwise: its mean over the validation
    samples that have values)."""
    if "value" in record:
        return record["value"]
    finite = [v for v in record["values"] if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _clean_label(sample: Any) -> int | None:
    meta = sample.get("meta") if isinstance(sample, dict) else None
    return meta.get("clean_label") if isinstance(meta, dict) else None
