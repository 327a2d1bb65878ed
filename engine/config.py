"""The valuation options: one frozen dataclass, validated once.

The Valuator, the engine core, the serving loop and every command of the CLI take their
options from ``ValuationConfig``; the CLI builds its flags from the field metadata below
(``forvalue.bindings.cli.options``), so an option has one name, one default and one check.
A command that needs another default declares it once, here, with its reason
(``COMMAND_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LOSS_ON = ("response", "all")
NORMALIZATIONS = ("none", "mean", "cosine")
ATTENTION_MODES = ("auto", "varlen", "flex", "buckets")
BACKENDS = ("auto", "torch", "triton")
POLICIES = ("fcfs", "priority")
PRECONDITIONERS = (None, "input")
ERRORS = ("raise", "collect")

# Which commands show an option (the serving options are the server's alone): how samples are
# labelled matters to every command that runs the model; how they are valued, to the valuing ones.
JOBS = ("score", "select", "serve")
# The index's two kinds of command: building it labels and runs the pool (how samples are
# valued is chosen per query); querying runs the target's samples with the index's labelling.
INDEX_BUILD, INDEX_QUERY = "index-build", "index-query"
VALUING = (*JOBS, INDEX_QUERY)
LABELLING = (*JOBS, "covariance", "warmup", INDEX_BUILD)
FORWARD = (*JOBS, "covariance", INDEX_BUILD)
FORWARD_STEPS = (*FORWARD, INDEX_QUERY)  # how forward steps are batched and run
SERVING = ("serve",)


def _option(default: Any, help: str, *, commands: tuple[str, ...] = JOBS, choices: tuple | None = None,
            aliases: tuple[str, ...] = (), changes_values: bool = True,
            flag_unit: tuple[str, float] | None = None) -> Any:
    """A field and its metadata. ``changes_values=False``: the option changes how the work is
    batched or run, not the values beyond the last bits, so a resumed job may change it.
    ``flag_unit=(suffix, per_unit)``: the flag counts in another unit, ``--name-suffix`` with
    ``per_unit`` of them to one unit of the field (milliseconds for seconds: ``("ms", 1000)``)."""
    metadata = {"help": help, "commands": commands, "choices": choices, "aliases": aliases,
                "changes_values": changes_values, "flag_unit": flag_unit}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ValuationConfig:
    """How samples are labelled, valued and batched. Invalid values raise ValueError."""

    loss_on: str = _option("response", "label tokens: the sample's own rules (response) or every "
                           "position from the second on (all)", commands=LABELLING, choices=LOSS_ON)
    normalize: str = _option("none", "divide each G(x) by nothing (none, as the paper), its label "
                             "count (mean) or its norm (cosine)", commands=VALUING,
                             choices=NORMALIZATIONS)
    precondition: str | None = _option(None, "input: the inner product under (A + lambda I)^-1, A the "
                                "covariance of the hidden states that enter G", commands=VALUING,
                                choices=PRECONDITIONERS)
    damping: float | None = _option(None, "lambda = damping * tr(A) / d (default: 0.01 when A comes "
                                    "from the validation set, 0.1 otherwise)", commands=(*VALUING, "eval"))
    skip_depth: float | None = _option(None, "also read the residual stream at this fraction of the "
                                       "layers (0.75: layer round(0.75 L)): G gains the block "
                                       "sum e_t r_t^T of a zero-initialised skip readout",
                                       commands=FORWARD)
    append_eos: bool = _option(False, "append the tokenizer's EOS to prompt/response samples",
                               commands=LABELLING)
    max_length: int | None = _option(None, "truncate longer samples (keeps the start) instead of "
                                     "refusing them", commands=LABELLING)
    batch_tokens: int = _option(4096, "tokens per forward step", commands=FORWARD_STEPS,
                                aliases=("--max-batch-tokens",), changes_values=False)
    max_seqs: int = _option(256, "samples per forward step (packed steps of short samples)",
                            commands=FORWARD_STEPS, changes_values=False)
    attention: str = _option("auto", "packed attention per segment (varlen), FlexAttention with a "
                             "document mask (flex), padded length buckets (buckets), or the best "
                             "the model's probe allows on this device (auto)",
                             commands=FORWARD_STEPS, choices=ATTENTION_MODES, changes_values=False)
    backend: str = _option("auto", "kernel implementation: Triton on CUDA, chunked torch on CPU "
                           "(auto), or forced", commands=FORWARD_STEPS, choices=BACKENDS,
                           changes_values=False)
    policy: str = _option("fcfs", "order of waiting requests: first come first served, or by "
                          "priority (lower first)", commands=SERVING, choices=POLICIES, changes_values=False)
    max_waiting: int | None = _option(None, "bound of the waiting queue (None: unbounded)", commands=(),
                                      changes_values=False)
    max_queue_delay: float = _option(0.0, "after a step that answered requests, wait this long for the "
                                     "callers' next samples before starting the next step (fuller "
                                     "steps, a little latency)", commands=SERVING, changes_values=False,
                                     flag_unit=("ms", 1000))

    def __post_init__(self) -> None:
        if self.precondition == "none":  # the CLI's spelling of None
            object.__setattr__(self, "precondition", None)
        for name in ("loss_on", "normalize", "precondition", "attention", "backend", "policy"):
            choices = self.metadata(name)["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        _check_positive("batch_tokens", self.batch_tokens)
        _check_positive("max_seqs", self.max_seqs)
        check_max_length(self.max_length)
        _check_positive("max_waiting", self.max_waiting)
        if self.damping is not None and not self.damping > 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        if self.damping is not None and self.precondition is None:
            raise ValueError("damping is an option of precondition='input'")
        if self.skip_depth is not None and not 0 < self.skip_depth < 1:
            raise ValueError(f"skip_depth must be between 0 and 1 (a fraction of the layers), "
                             f"got {self.skip_depth}")
        if not self.max_queue_delay >= 0:
            raise ValueError(f"max_queue_delay must be >= 0 (seconds; --max-queue-delay-ms on the command "
                             f"line), got {self.max_queue_delay:g}")

    @classmethod
    def metadata(cls, name: str) -> dict[str, Any]:
        return cls.__dataclass_fields__[name].metadata

    @classmethod
    def for_command(cls, command: str, **options: Any) -> ValuationConfig:
        """The config of ``command`` (its declared defaults, then ``options``)."""
        return cls(**{**COMMAND_DEFAULTS.get(command, {}), **options})

    @classmethod
    def from_options(cls, command: str, options: Mapping[str, Any]) -> ValuationConfig:
        """The config of ``command`` from keyword options, which may use a field's alias without
        its dashes (``max_batch_tokens`` for ``batch_tokens``), as callers of older keywords do."""
        aliases = {alias.lstrip("-").replace("-", "_"): f.name
                   for f in dataclasses.fields(cls) for alias in f.metadata["aliases"]}
        return cls.for_command(command, **{aliases.get(key, key): value for key, value in options.items()})

    def replace(self, **changes: Any) -> ValuationConfig:
        return dataclasses.replace(self, **changes)

    def value_options(self) -> dict[str, Any]:
        """The options that change the values (not only their last bits): part of a job's identity."""
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.metadata["changes_values"]}


# Where users pick data (forvalue select, forvalue demo): the forward-only variant that measured
# best across the quality tasks (bench/results/quality.md): the preconditioned value with A from
# the validation set, cosine-normalised, with the skip readout at 3/4 of the depth. The
# Valuator's own default stays the paper's value.
DATA_SELECTION = {"precondition": "input", "normalize": "cosine", "skip_depth": 0.75}

# Per-command defaults, each with its reason.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "select": DATA_SELECTION,
    "demo": DATA_SELECTION,
    # An index serves select: its pool is read with select's readout, and its queries value
    # as select does (A from the target; from the pool for a single sample's query).
    INDEX_BUILD: {"skip_depth": DATA_SELECTION["skip_depth"]},
    INDEX_QUERY: {key: DATA_SELECTION[key] for key in ("precondition", "normalize")},
    # A serving step is what a newly arrived sample waits behind: a smaller token budget keeps
    # that wait short; 128 samples a step is plenty at that budget. The queue delay lets
    # closed-loop callers (next sample sent on the previous result) join the next step.
    "serve": {"batch_tokens": 2048, "max_seqs": 128, "max_queue_delay": 0.002},
}


def check_max_length(value: int | None) -> None:
    """The one rule for ``max_length``: None, or an integer of at least 2 (one token has no label)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ValueError(f"max_length must be an integer >= 2 (one token has no label), got {value!r}")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
