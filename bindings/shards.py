"""The files of a batch job, how ``--shard I/N`` splits the samples, and ``forvalue merge``,
which joins the shards' files again.

Light on purpose (no torch, no engine): ``forvalue merge`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .report import print_summary
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


def merge_shards(parts: Sequence[str], out: Path) -> dict[str, Any]:
    """Join shard outputs (and their errors files) into one, in input order, checking that
    no sample appears twice."""
    merged: dict[str, list[dict[str, Any]]] = {"results": [], "errors": []}
    for part in parts:
        files = JobFiles(Path(part))
        if not files.out.exists():
            raise FileNotFoundError(f"no such shard output: {part}")
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
    return {"merged": len(results), "errors": len(merged["errors"]), "out": str(out)}


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue merge``."""
    parser.description = "Join shard outputs (and their errors files) in input order, refusing a " \
                         "sample that appears twice."
    parser.add_argument("parts", nargs="+", help="the shards' --out files")
    parser.add_argument("--out", type=Path, required=True)


def run_merge(args: argparse.Namespace) -> int:
    """``forvalue merge``; returns the exit status."""
    print_summary(merge_shards(args.parts, args.out))
    return 0
