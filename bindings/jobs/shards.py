"""The files of a batch job, how ``--shard I/N`` splits the samples, and the merge of the
shards' files (``forvalue merge``, bindings/cli/merge.py).

Light on purpose (no torch, no engine): ``forvalue merge`` starts in a fraction of a second.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .job_record import JobIdentity, JobMismatch, listed, read_record, write_record
from .result_log import errors_path, read_complete_lines, write_jsonl_atomic


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


@dataclass
class JobFiles:
    """Every file a job writes, derived from ``--out``."""

    out: Path

    @property
    def errors(self) -> Path:
        return errors_path(self.out)

    @property
    def reference(self) -> Path:
        return self.out.with_name(self.out.stem + ".ref.safetensors")

    @property
    def matrix(self) -> Path:
        return self.out.with_name(self.out.stem + ".npy")

    @property
    def topk(self) -> Path:
        return self.out.with_name(self.out.stem + ".topk.jsonl")

    @property
    def job(self) -> Path:
        """The identity of the job that writes these files (job_record.py)."""
        return self.out.with_name(self.out.stem + ".job.json")

    @property
    def outputs(self) -> tuple[Path, ...]:
        """What the job writes, ``out`` first (removed by ``--overwrite``)."""
        return self.out, self.errors, self.reference, self.matrix, self.topk


def merge_shards(parts: Sequence[str], out: Path) -> dict[str, Any]:
    """Join shard outputs (and their errors files) into one, in input order, checking that
    no sample appears twice."""
    shards = [JobFiles(Path(part)) for part in parts]
    for files in shards:
        if not files.out.exists():
            raise FileNotFoundError(f"no such shard output: {files.out}")
    job = _one_job(shards)  # shards of different jobs are refused before anything is read
    merged: dict[str, list[dict[str, Any]]] = {"results": [], "errors": []}
    for files in shards:
        merged["results"] += read_complete_lines(files.out)
        merged["errors"] += read_complete_lines(files.errors)
    seen: set[int] = set()
    for record in merged["results"] + merged["errors"]:
        if record["index"] in seen:
            raise ValueError(f"sample index {record['index']} appears in more than one shard")
        seen.add(record["index"])
    target = JobFiles(out)
    results = sorted(merged["results"], key=lambda r: r["index"])
    write_jsonl_atomic(target.out, results)
    write_jsonl_atomic(target.errors, sorted(merged["errors"], key=lambda r: r["index"]))
    if results and "values" in results[0]:
        np.save(target.matrix, np.array([r["values"] for r in results], dtype=np.float64))
    if job is None:  # a record of an earlier merge would describe another job's values
        target.job.unlink(missing_ok=True)
    else:
        write_record(target.job, job)
    return {"merged": len(results), "errors": len(merged["errors"]), "out": str(out)}


def _one_job(parts: Sequence[JobFiles]) -> JobIdentity | None:
    """The identity of the merged output: the shards' common one, with the shards listed
    (None, with a warning, when no shard has a record); shards of different jobs are refused."""
    recorded = {files.out: read_record(files.job) for files in parts if files.job.exists()}
    if not recorded:
        print("forvalue: the shards carry no job records: merged without checking that they are "
              "shards of one job", file=sys.stderr)
        return None
    if len(recorded) < len(parts):
        missing = next(files.out for files in parts if files.out not in recorded)
        raise JobMismatch(f"{missing} has no job record, the other shards do: merge the shards of one job")
    (first, identity), *others = recorded.items()
    whole = JobIdentity({**identity.compared, "shard": None}, identity.named)
    for out, other in others:
        differences = JobIdentity({**other.compared, "shard": None}, other.named).differences(whole)
        if differences:
            raise JobMismatch(f"{out} and {first} are shards of different jobs ({listed(differences)})")
    shards = "+".join(sorted(str(other.compared["shard"]) for other in recorded.values()))
    return JobIdentity({**identity.compared, "shard": shards}, identity.named)

