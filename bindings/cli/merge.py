"""``forvalue merge``: the shards of one job joined in input order (bindings/jobs/shards.py).

Light on purpose (no torch, no engine): it starts in a fraction of a second."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..jobs.shards import merge_shards
from .report import print_summary


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
