"""What the engine hands out: label states from the runner, the typed outcome of a step, and
the results and statistics a caller sees.

Like vLLM v1's ``outputs.py``: one module of plain data types, so that the runner, the
scheduler, the core and every front end (offline Valuator, AsyncEngine, bindings) agree on
what a step produced without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .core.request import Request
    from .inputs.samples import EncodedSample


@dataclass
class LabelStates:
    """A sample's label tokens: the hidden state predicting each one, and the label."""

    index: int
    sample: EncodedSample
    hidden: torch.Tensor  # (n, d), model dtype, on the model's device
    labels: torch.Tensor  # (n,) int64
    positions: list[int]  # token positions k of the labels (predicted from k - 1)
    squared_norm: float | None = None  # ||G(x)||^2 (preconditioned when P is used), cached


@dataclass(frozen=True)
class TokenValues:
    """Per-token contributions ``s_t`` of one sample; they sum to its value."""

    positions: np.ndarray  # token positions k of the labels
    token_ids: np.ndarray  # the label tokens
    values: np.ndarray  # float64, normalised like the sample's value

    @classmethod
    def of(cls, states: LabelStates, scores: torch.Tensor) -> TokenValues:
        return cls(np.asarray(states.positions), states.labels.cpu().numpy(),
                   scores.double().cpu().numpy())


@dataclass(frozen=True)
class Valuation:
    """Values of a Valuator call in one type, whatever went wrong with some samples: ``values``
    (numpy float64; NaN where a sample failed: ``(n,)``, or ``(n_train, n_valid)`` for pairs),
    the ``errors`` of those samples (SampleError, each with its ``index``), and per-token
    contributions when asked for (None in a failed sample's slot)."""

    values: np.ndarray
    errors: list = field(default_factory=list)  # list[SampleError]
    token_values: list[TokenValues | None] | None = None


@dataclass
class RunnerOutput:
    """What one forward step gave: completed requests with their label states, and requests
    the runner gave up on (non-finite hidden states). A chunk that is not a request's last
    appears in neither."""

    finished: list[tuple[Request, LabelStates]] = field(default_factory=list)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)  # SampleError, or a bug


@dataclass
class Finished:
    """A completed request. ``token_scores`` (normalised ``s_t``) and ``value`` are set when
    the request was scored against a reference."""

    request: Request
    states: LabelStates
    token_scores: torch.Tensor | None = None

    @property
    def value(self) -> float:
        return math.nan if self.token_scores is None else float(self.token_scores.sum())


@dataclass
class StepOutput:
    """One engine step: what completed, what failed (with the reason) and what expired."""

    finished: list[Finished] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)
    expired: list[Request] = field(default_factory=list)
    num_tokens: int = 0
    seconds: float = 0.0

    @property
    def answered_any(self) -> bool:
        return bool(self.finished or self.failed)


@dataclass(frozen=True)
class ScoreResult:
    """One sample's answer. ``error`` is "" when scored; then ``value`` is finite."""

    id: str
    reference: str
    value: float = math.nan
    error: str = ""
    num_tokens: int = 0
    num_labels: int = 0
    truncated: bool = False
    token_values: TokenValues | None = None
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    request_id: int = -1


@dataclass(frozen=True)
class ReferenceInfo:
    name: str
    count: int
    normalize: str
    loss_on: str
    skipped: int  # samples left out of the last build (bad samples)
    version: int  # increases with every replacement under this name
    precondition: str = "none"
    damping: float = 0.0
    covariance: str = ""  # where A came from: "valid" (the reference's own samples) or a name
    fingerprint: str = ""  # Reference.fingerprint(): equal on replicas that score alike


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    references: int
    steps: int
    tokens_total: int
    tokens_per_second: float
    requests: dict[str, int]  # outcome -> count
    latency: dict[str, dict[float, float]]  # "queue" | "compute" | "total" -> quantile -> s
    # name -> (upper bounds, cumulative counts per bound, sum, count) since start
    histograms: dict[str, tuple[tuple[float, ...], list[int], float, int]] = field(default_factory=dict)
