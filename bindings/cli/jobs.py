"""``forvalue score`` and ``forvalue select``: their options and the code that opens a job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from forvalue.engine import Valuator
from forvalue.engine.inputs.readers import read_samples

from ..jobs.batch import STRATEGIES, memory_estimate, run_score, select_top
from ..jobs.job_record import claim_batch_output
from ..jobs.result_log import read_complete_lines
from ..jobs.shards import JobFiles, Shard
from .options import (
    add_covariance_argument,
    add_model_arguments,
    add_valuation_arguments,
    config_from_args,
    covariance_from_args,
    load_model_from_args,
)
from .ray_job import add_ray_arguments, print_ray_summary, run_ray_job
from .report import print_summary

FIELD_KEYS = ("prompt", "response", "text", "messages", "id")


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue score``."""
    parser.description = (
        "Value every training sample against a validation set (mode reference: one value per "
        "sample; pairwise: one per pair, also as .npy; self: ||G(x)||^2). Results are appended to "
        "--out as they are computed: run the same command again after an interruption and it resumes.")
    _add_job_arguments(parser, "score")
    parser.add_argument("--valid", default=None,
                        help="validation samples, or a saved Reference (.safetensors) for mode reference")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL ({id, index, value})")
    parser.add_argument("--mode", choices=("reference", "pairwise", "self"), default="reference")
    parser.add_argument("--shard", default=None, metavar="I/N", help="value only shard I of N")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="pairwise: write each validation sample's K most and least valuable "
                             "training samples to OUT.topk.jsonl")


def run_score_command(args: argparse.Namespace) -> int:
    """``forvalue score``; returns the exit status."""
    if args.ray:
        return print_ray_summary(run_ray_job(args, "score", args.mode, args.out, _fields(args)))
    shard, files = Shard.parse(args.shard), JobFiles(args.out)
    claim_batch_output(args, "score", args.mode, config_from_args(args, "score"), files, _fields(args))
    valuator, train = _open_job(args, "score", args.mode)
    summary = run_score(valuator, train, args.valid, files, mode=args.mode, shard=shard,
                        checkpoint=args.checkpoint, top_k=args.top_k, valid_fields=_fields(args))
    print_summary(summary)
    return 0


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue select``."""
    parser.description = ("Value the training samples against a validation set (resumable, in "
                          "OUT.values.jsonl) and write the top --ratio of them, as given, to --out.")
    _add_job_arguments(parser, "select")
    parser.add_argument("--valid", required=True,
                        help="validation samples, or a saved Reference (.safetensors)")
    parser.add_argument("--ratio", type=float, required=True, help="share of samples to keep, in (0, 1]")
    parser.add_argument("--strategy", choices=STRATEGIES, default="top",
                        help="top: the highest values against the validation set; round-robin: "
                             "each validation sample in turn takes its most valuable remaining "
                             "training sample, so that every kind of validation sample is served "
                             "(pairwise values: --valid must be samples, not a saved Reference)")
    parser.add_argument("--out", type=Path, required=True, help="JSONL of the selected samples")


def run_select(args: argparse.Namespace) -> int:
    """``forvalue select``; returns the exit status."""
    if not 0 < args.ratio <= 1:
        raise ValueError(f"--ratio must lie in (0, 1], got {args.ratio}")
    mode = "reference" if args.strategy == "top" else "pairwise"
    # Apart from the top strategy's values: a run resumes only from values of its own kind.
    suffix = ".values.jsonl" if mode == "reference" else ".pairwise.values.jsonl"
    files = JobFiles(args.out.with_name(args.out.stem + suffix))
    if args.ray:
        if args.out_format != "jsonl":
            raise ValueError("select writes the chosen samples as JSONL: drop --out-format")
        if mode == "pairwise":
            raise ValueError("--strategy round-robin runs without --ray (the Ray job values against "
                             "the validation set as a whole)")
        if run_ray_job(args, "select", mode, files.out, _fields(args)) is None:
            return 1
        train = read_samples(args.train, fields=_fields(args), split=args.split)
    else:
        claim_batch_output(args, "select", mode, config_from_args(args, "select"), files, _fields(args))
        valuator, train = _open_job(args, "select", mode)
        run_score(valuator, train, args.valid, files, mode=mode, shard=Shard(0, 1),
                  checkpoint=args.checkpoint, top_k=None, valid_fields=_fields(args))
    records = read_complete_lines(files.out)
    print_summary({**select_top(train, records, args.ratio, args.out, args.strategy),
                   "values": str(files.out), "errors_file": str(files.errors)})
    return 0


def _add_job_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """What ``score`` and ``select`` share: model, data, valuation options, checkpoints."""
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, help="training samples: .jsonl, .parquet or a "
                        "saved datasets folder")
    parser.add_argument("--checkpoint", type=int, default=64,
                        help="training samples valued between two saved checkpoints (with --ray: "
                             "rows per actor batch)")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over when --out holds the values of another job (by default a "
                             "rerun resumes the same job and refuses another one)")
    for key in FIELD_KEYS:
        parser.add_argument(f"--{key}-field", default=None, metavar="COLUMN",
                            help=f"column holding the sample's {key!r}")
    add_valuation_arguments(parser, command)
    add_covariance_argument(parser)
    add_ray_arguments(parser)


def _fields(args: argparse.Namespace) -> dict[str, str]:
    return {key: getattr(args, f"{key}_field") for key in FIELD_KEYS if getattr(args, f"{key}_field")}


def _open_job(args: argparse.Namespace, command: str, mode: str) -> tuple[Valuator, Sequence[dict]]:
    """Valuator and training samples, with the memory estimate printed first."""
    config = config_from_args(args, command)
    covariance = covariance_from_args(args, config)
    train = read_samples(args.train, fields=_fields(args), split=args.split)
    model = load_model_from_args(args)
    valuator = Valuator(model, config=config, covariance=covariance, progress=False)
    print(f"forvalue: {len(train)} training samples; "
          + memory_estimate(valuator.model, mode, config.batch_tokens, 0), file=sys.stderr)
    return valuator, train
