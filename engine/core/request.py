"""A request: one encoded sample on its way through the scheduler and the model runner.

Like a vLLM ``Request``: the scheduler reads its length, priority, arrival and deadline and
moves it between queues; the runner advances ``num_computed_tokens`` chunk by chunk and keeps
the KV cache of a chunked request between steps. What is done with the label states once the
forward is over (``task``) is the business of whoever submitted the request.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..inputs.samples import EncodedSample

if TYPE_CHECKING:
    from .engine_core import BuildTask, ScoreTask

_request_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"  # scheduled in the step in flight, or a chunked request between chunks
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_done(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class PartialStates:
    """Label states of one chunk: the hidden states predicting labels inside it."""

    hidden: torch.Tensor  # (n, d)
    labels: torch.Tensor  # (n,) int64
    positions: list[int]


@dataclass(eq=False)
class Request:
    """``priority``: lower runs first (vLLM's convention); ties run in arrival order.
    ``deadline``: a ``time.monotonic()`` instant after which the request is dropped unrun.
    ``index``: the caller's position of the sample (offline jobs place results by it)."""

    sample: EncodedSample
    index: int = 0
    priority: int = 0
    deadline: float | None = None
    task: ScoreTask | BuildTask | None = None  # None: hand the label states back
    request_id: int = field(default_factory=lambda: next(_request_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    first_scheduled_time: float | None = None
    finish_time: float | None = None
    kv_cache: Any = None  # the past keys and values of a chunked request
    partial_states: list[PartialStates] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.sample.input_ids)

    @property
    def num_remaining_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def release(self) -> None:
        """Free what a chunked request holds between steps (its KV cache, its label states)."""
        self.kv_cache = None
        self.partial_states = []

    def finish(self, status: RequestStatus) -> None:
        self.status = status
        self.finish_time = time.monotonic()
        self.release()
