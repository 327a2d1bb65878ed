"""The ``forvalue`` command line (console script ``forvalue = forvalue.bindings.cli:main``).

Each subcommand registers its own parser and a handler returning the exit status. A user
mistake (a bad sample, a bad option, a model that cannot be valued, a mismatched reference, a
file that cannot be read or written: a ValueError or OSError) ends with one
``forvalue: error: ...`` line and exit status 2, never a stack trace; ``FORVALUE_DEBUG=1``
shows the trace. Anything else is a bug and is raised.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from forvalue.engine import __version__

# SampleError, ModelError and ReferenceMismatch are ValueErrors; so are bad option values.
USER_ERRORS = (ValueError, OSError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def user_error(error: object) -> int:
    """Report a user mistake in one line (no stack trace); returns the exit status."""
    print(f"forvalue: error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forvalue", description="Forward-only data valuation (For-Value) of fine-tuning data.")
    parser.add_argument("--version", action="version", version=f"forvalue {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_score(commands)
    _add_select(commands)
    _add_merge(commands)
    _add_delegated(commands, "serve", "run the gRPC valuation server", "forvalue.bindings.server",
                   "add_serve_arguments", "run_serve")
    _add_delegated(commands, "stream", "stream a JSONL file through a server (resumable)",
                   "forvalue.bindings.client", "add_stream_arguments", "run_stream")
    _add_delegated(commands, "eval", "the paper's quality tasks against gradient baselines",
                   "forvalue.bench.eval", "add_eval_arguments", "run_eval")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``forvalue`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if os.environ.get("FORVALUE_DEBUG"):
            raise
        return user_error(error)
    except KeyboardInterrupt:
        print("forvalue: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="value a small mislabelled chat data set with the embedded model",
        description="Build a small seeded chat task with a fifth of the answers wrong, value every "
                    "training sample against a clean validation set, and report how well low values "
                    "find the wrong answers. Needs no arguments and no network.")
    demo.add_argument("--out", type=Path, default=Path("forvalue-demo"),
                      help="folder for values.jsonl, train.jsonl, valid.jsonl, summary.json and "
                           "values.png (default: ./forvalue-demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated task (default: 0)")
    demo.add_argument("--model", default="smollm2-135m",
                      help="embedded model name or local Hugging Face model folder "
                           "(default: smollm2-135m)")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    # Imported here so that other commands and `--help` do not load matplotlib.
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, model_name=args.model)
    return 0


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``score`` and ``select`` share: model, data, labels, checkpoints."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded name, local model folder or cached Hugging Face id")
    parser.add_argument("--adapter", default=None, help="local PEFT (LoRA) adapter folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or float64")
    parser.add_argument("--train", required=True, help="training samples: .jsonl, .parquet or a "
                        "saved datasets folder")
    parser.add_argument("--loss-on", choices=("response", "all"), default="response")
    parser.add_argument("--normalize", choices=("none", "mean", "cosine"), default="none")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate longer samples (keeps the start) instead of refusing them")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward step")
    parser.add_argument("--checkpoint", type=int, default=64,
                        help="training samples valued between two saved checkpoints")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict")
    for key in ("prompt", "response", "text", "messages", "id"):
        parser.add_argument(f"--{key}-field", default=None, metavar="COLUMN",
                            help=f"column holding the sample's {key!r}")


def _fields(args: argparse.Namespace) -> dict[str, str]:
    return {key: getattr(args, f"{key}_field") for key in ("prompt", "response", "text", "messages", "id")
            if getattr(args, f"{key}_field")}


def _open_job(args: argparse.Namespace, mode: str) -> tuple:
    """Model, valuator and training samples, with the memory estimate printed first."""
    from forvalue.engine import Valuator, load_model
    from forvalue.engine.readers import read_samples

    from .batch import memory_estimate

    train = read_samples(args.train, fields=_fields(args), split=args.split)
    model = load_model(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
    valuator = Valuator(model, loss_on=args.loss_on, normalize=args.normalize,
                        max_length=args.max_length, batch_tokens=args.batch_tokens, progress=False)
    print(f"forvalue: {len(train)} training samples; "
          + memory_estimate(model, mode, args.batch_tokens, 0), file=sys.stderr)
    return valuator, train


def _add_score(commands: argparse._SubParsersAction) -> None:
    score = commands.add_parser(
        "score", help="value training samples (resumable, shardable)",
        description="Value every training sample against a validation set (mode reference: one "
                    "value per sample; pairwise: one per pair, also as .npy; self: ||G(x)||^2). "
                    "Results are appended to --out as they are computed: run the same command "
                    "again after an interruption and it resumes.")
    _add_job_arguments(score)
    score.add_argument("--valid", default=None,
                       help="validation samples, or a saved Reference (.safetensors) for mode reference")
    score.add_argument("--out", type=Path, required=True, help="output JSONL ({id, index, value})")
    score.add_argument("--mode", choices=("reference", "pairwise", "self"), default="reference")
    score.add_argument("--shard", default=None, metavar="I/N", help="value only shard I of N")
    score.add_argument("--top-k", type=int, default=None, metavar="K",
                       help="pairwise: write each validation sample's K most and least valuable "
                            "training samples to OUT.topk.jsonl")
    score.set_defaults(handler=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from .batch import JobFiles, Shard, run_score

    shard = Shard.parse(args.shard)
    valuator, train = _open_job(args, args.mode)
    summary = run_score(valuator, train, args.valid, JobFiles(args.out), mode=args.mode, shard=shard,
                        checkpoint=args.checkpoint, top_k=args.top_k, valid_fields=_fields(args))
    _print_summary(summary)
    return 0


def _add_select(commands: argparse._SubParsersAction) -> None:
    select = commands.add_parser(
        "select", help="keep the most valuable training samples",
        description="Value the training samples against a validation set (resumable, in "
                    "OUT.values.jsonl) and write the top --ratio of them, as given, to --out.")
    _add_job_arguments(select)
    select.add_argument("--valid", required=True,
                        help="validation samples, or a saved Reference (.safetensors)")
    select.add_argument("--ratio", type=float, required=True, help="share of samples to keep, in (0, 1]")
    select.add_argument("--out", type=Path, required=True, help="JSONL of the selected samples")
    select.set_defaults(handler=_run_select)


def _run_select(args: argparse.Namespace) -> int:
    from .batch import JobFiles, Shard, run_score, select_top

    if not 0 < args.ratio <= 1:
        raise ValueError(f"--ratio must lie in (0, 1], got {args.ratio}")
    valuator, train = _open_job(args, "reference")
    files = JobFiles(args.out.with_name(args.out.stem + ".values.jsonl"))
    run_score(valuator, train, args.valid, files, mode="reference", shard=Shard(0, 1),
              checkpoint=args.checkpoint, top_k=None, valid_fields=_fields(args))
    records = _read_jsonl(files.out)
    _print_summary({**select_top(train, records, args.ratio, args.out), "values": str(files.out),
                    "errors_file": str(files.errors)})
    return 0


def _add_merge(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser("merge", help="join the outputs of `score --shard` jobs",
                                description="Join shard outputs (and their errors files) in input "
                                            "order, refusing a sample that appears twice.")
    merge.add_argument("parts", nargs="+", help="the shards' --out files")
    merge.add_argument("--out", type=Path, required=True)
    merge.set_defaults(handler=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from .batch import merge_shards

    _print_summary(merge_shards(args.parts, args.out))
    return 0


def _add_delegated(commands: argparse._SubParsersAction, name: str, help_text: str, module: str,
                   add_arguments: str, run: str) -> None:
    """A subcommand whose options and handler live in another module (server, client, eval)."""
    target = importlib.import_module(module)
    parser = commands.add_parser(name, help=help_text)
    getattr(target, add_arguments)(parser)
    # run_serve and run_stream return an exit status, run_eval its results.
    parser.set_defaults(handler=lambda args: _exit_status(getattr(target, run)(args)))


def _exit_status(result: object) -> int:
    return result if isinstance(result, int) else 0


def _read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
