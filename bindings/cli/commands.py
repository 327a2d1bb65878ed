"""The ``forvalue`` command line (console script ``forvalue = forvalue.bindings.cli:main``).

Each subcommand is a row of ``COMMANDS``: the module holding its options and its handler is
imported only when that subcommand is chosen, so ``forvalue --help`` and ``forvalue merge``
load neither torch nor grpc. A handler returns the exit status. A user mistake (a bad sample,
a bad option, a model that cannot be valued, a mismatched reference, a file that cannot be
read or written: a ValueError or OSError) ends with one ``forvalue: error: ...`` line and exit
status 2, never a stack trace; ``FORVALUE_DEBUG=1`` shows the trace. Anything else is a bug
and is raised.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .report import USER_ERRORS, user_error

EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module.add_arguments(parser)`` adds its options, ``module.run(args)``
    runs it (returning its exit status, or its results for ``eval``)."""

    name: str
    help: str
    module: str
    add_arguments: str
    run: str

    def function(self, name: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), name)


COMMANDS = (
    Command("demo", "value a small mislabelled chat data set with the embedded model",
            "forvalue.bindings.cli.demo", "add_demo_arguments", "run_demo_command"),
    Command("score", "value training samples (resumable, shardable)",
            "forvalue.bindings.cli.jobs", "add_score_arguments", "run_score_command"),
    Command("select", "keep the most valuable training samples",
            "forvalue.bindings.cli.jobs", "add_select_arguments", "run_select"),
    Command("covariance", "accumulate sum h h^T of a sample set for --precondition input",
            "forvalue.bindings.cli.prepare", "add_covariance_arguments", "run_covariance"),
    Command("warmup", "fine-tune a LoRA adapter on the training pool (for --adapter)",
            "forvalue.bindings.cli.prepare", "add_warmup_arguments", "run_warmup"),
    Command("index", "value a pool once, then select and query for any target from the store",
            "forvalue.bindings.cli.index", "add_index_arguments", "run_index"),
    Command("merge", "join the outputs of `score --shard` jobs",
            "forvalue.bindings.cli.merge", "add_merge_arguments", "run_merge"),
    Command("serve", "run the gRPC valuation server",
            "forvalue.bindings.cli.serve", "add_serve_arguments", "run_serve"),
    Command("stream", "stream a JSONL file through a server (resumable)",
            "forvalue.bindings.cli.stream", "add_stream_arguments", "run_stream"),
    Command("eval", "the paper's quality tasks against gradient baselines",
            "forvalue.bench.evals.eval", "add_eval_arguments", "run_eval"),
)
BY_NAME = {command.name: command for command in COMMANDS}


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its options (and so its module) are loaded when it parses."""

    def __init__(self, *args: Any, command: Command, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command = command
        self.loaded = False

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if not self.loaded:
            self.command.function(self.command.add_arguments)(self)
            self.loaded = True
        return super().parse_known_args(args, namespace)


class _Version(argparse.Action):
    """``--version``; the version is imported only when asked, like everything else."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from forvalue.engine.version import __version__

        print(f"forvalue {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forvalue", description="Forward-only data valuation (For-Value) of fine-tuning data.")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_CommandParser)
    for command in COMMANDS:
        commands.add_parser(command.name, help=command.help, command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``forvalue`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    command = BY_NAME[args.command]
    try:
        result = command.function(command.run)(args)
    except USER_ERRORS as error:
        if os.environ.get("FORVALUE_DEBUG"):
            raise
        return user_error(error)
    except KeyboardInterrupt:
        print("forvalue: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0  # run_eval returns its results

