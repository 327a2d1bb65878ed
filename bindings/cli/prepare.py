"""``forvalue covariance`` and ``forvalue warmup``: what a valuation can be prepared with.

A covariance file (``forvalue.covariance/1``: float64 ``sum h h^T``, the token count, the
model's identity, a fingerprint of the samples and ``loss_on``) gives the preconditioned value
its ``A`` from any sample set, e.g. the training pool, the same for every shard, worker and
server. A warm-up adapter (PEFT's format) is a one-epoch LoRA fine-tune on the training pool;
``--adapter DIR`` then values with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forvalue.engine import Covariance, Valuator
from forvalue.engine.inputs.readers import read_samples

from .options import add_model_arguments, add_valuation_arguments, config_from_args, load_model_from_args
from .ray_job import add_ray_arguments, run_ray_covariance
from .report import print_summary


def add_covariance_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue covariance``."""
    parser.description = ("Accumulate sum h h^T over the label-predicting hidden states of a sample "
                          "set (one forward pass) into a covariance file for --precondition input "
                          "--covariance FILE.")
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, help="samples: .jsonl, .parquet or a saved datasets folder")
    parser.add_argument("--out", type=Path, required=True, help="covariance file (.safetensors)")
    add_valuation_arguments(parser, "covariance")
    add_ray_arguments(parser, out_format=False)


def run_covariance(args: argparse.Namespace) -> int:
    """``forvalue covariance``; returns the exit status."""
    if args.ray:
        built = run_ray_covariance(args)
        if built is None:
            return 1
        (covariance, skipped), counts = built, {}
    else:
        covariance, skipped, valued = _local_covariance(args)
        counts = {"samples": valued}
    covariance.save(args.out)
    print_summary({"covariance": str(args.out), **counts, "skipped": skipped, "tokens": covariance.tokens,
                   "effective_rank": covariance.effective_rank})
    return 0


def _local_covariance(args: argparse.Namespace) -> tuple[Covariance, int, int]:
    """The covariance, the samples skipped and those summed, in this process."""
    config = config_from_args(args, "covariance")
    samples = read_samples(args.train)
    model = load_model_from_args(args)
    covariance, errors = Valuator(model, config=config, progress=True).covariance(samples, errors="collect")
    for error in errors:
        print(f"forvalue: skipped {error}", file=sys.stderr)
    return covariance, len(errors), len(samples) - len(errors)


def add_warmup_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue warmup``."""
    parser.description = ("Fine-tune a LoRA adapter on the training pool (a backward pass; needs "
                          "peft) and save it in PEFT's format, for --adapter DIR.")
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, help="training samples: .jsonl, .parquet or a saved folder")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the pool (default: 1)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter's init and shuffling")
    add_valuation_arguments(parser, "warmup")


def run_warmup(args: argparse.Namespace) -> int:
    """``forvalue warmup``; returns the exit status."""
    from forvalue.engine.warmup import warmup

    samples = read_samples(args.train)
    model = load_model_from_args(args)
    result = warmup(model, samples, args.out, config=config_from_args(args, "warmup"), epochs=args.epochs,
                    rank=args.rank, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    print_summary({"adapter": str(result.adapter), "steps": result.steps,
                   "seconds": round(result.seconds, 1),
                   "loss_per_epoch": [round(loss, 4) for loss in result.losses]})
    return 0
