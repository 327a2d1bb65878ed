"""Continuous batching: which requests the next forward pass (a step) runs.

Modelled on vLLM v1's scheduler, without a decode phase (valuation is prefill only):

- waiting requests are ordered first come first served, or by priority then arrival;
- a *packed step* takes whole requests in that order (skipping those that do not fit the
  room left) until ``batch_tokens`` or ``max_seqs`` is reached;
- a request longer than ``batch_tokens`` is *chunked*: it runs its chunks alone, one
  step each, its KV cache carried between them (the budget bounds activations, not the
  cache). Chunk steps alternate with packed steps, so a long sample never blocks short ones
  and short ones never starve a long one. One chunked request runs at a time, which bounds
  the memory held in KV caches.

The scheduler is not thread-safe: one owner (the engine loop) calls it between steps.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ValuationConfig
from ..outputs import RunnerOutput
from .request import Request, RequestStatus

# A packed step looks past requests that do not fit the room left, but only this many, so
# that scheduling stays cheap with a long queue.
LOOKAHEAD = 256


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests already."""


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``[start, end)`` of a request, run in this step."""

    request: Request
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def is_last(self) -> bool:
        return self.end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One step: whole requests packed together, or one chunk of a long request."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    is_chunk_step: bool = False
    expired: list[Request] = field(default_factory=list)  # dropped before running, unanswered

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def requests(self) -> list[Request]:
        return [chunk.request for chunk in self.chunks]


class Scheduler:
    """Its limits are the config's: ``batch_tokens`` and ``max_seqs`` per step, ``policy``,
    ``max_waiting`` (None: unbounded, for offline jobs that hold their samples anyway).
    ``split_long=False``: a long request still runs alone, but whole, in one chunk step (a
    backbone with its own scheduler, vLLM, carries no cache between our steps)."""

    def __init__(self, config: ValuationConfig, *, split_long: bool = True) -> None:
        self.config = config
        self.split_long = split_long
        self._waiting: list[Request] = []  # sorted by self._order
        self._chunked: Request | None = None  # the long request between its chunks
        self._in_flight: SchedulerOutput | None = None
        self._last_step_chunked = False
        self._order: Callable[[Request], tuple] = (
            (lambda r: (r.priority, r.arrival_time, r.request_id)) if config.policy == "priority"
            else (lambda r: (r.arrival_time, r.request_id)))

    # ------------------------------------------------------------------ queues

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        in_flight = 0 if self._in_flight is None else len(self._in_flight.chunks)
        between_chunks = self._chunked is not None and not self._chunk_in_flight()
        return in_flight + int(between_chunks)

    def num_waiting_tokens(self) -> int:
        """Tokens still to forward (waiting requests, and the rest of a chunked one)."""
        chunked = 0 if self._chunked is None else self._chunked.num_remaining_tokens
        return chunked + sum(request.num_tokens for request in self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or self._chunked is not None or self._in_flight is not None

    def has_room(self) -> bool:
        return self.config.max_waiting is None or len(self._waiting) < self.config.max_waiting

    def add(self, request: Request) -> None:
        """Queue a request; raises QueueFull (the request is not queued). Its length was
        checked against the model's context when it was encoded."""
        if not self.has_room():
            raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
        request.status = RequestStatus.WAITING
        bisect.insort(self._waiting, request, key=self._order)

    def cancel(self, request: Request, status: RequestStatus = RequestStatus.CANCELLED) -> bool:
        """Drop a request wherever it is (``status``: cancelled, or failed when the runner gave
        up on it); False when it is already done. A request in the step in flight is marked
        now and released by ``update`` once the step is over."""
        if request.status.is_done:
            return False
        if request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        if self._is_in_flight(request):
            request.status = status  # the runner may be using its cache right now
            return True
        if request is self._chunked:
            self._chunked = None
        request.finish(status)
        return True

    # ------------------------------------------------------------------ steps

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """The next step; empty when nothing can run. Call ``update`` once it has run."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() called before update() of the step in flight")
        now = time.monotonic() if now is None else now
        output = SchedulerOutput(expired=self._expire(now))
        if self._chunked is not None and (not self._last_step_chunked or not self._waiting):
            self._schedule_chunk(output)
        else:
            self._schedule_packed(output)
            if not output.chunks and self._chunked is not None:
                self._schedule_chunk(output)
        self._last_step_chunked = output.is_chunk_step
        for chunk in output.chunks:
            chunk.request.status = RequestStatus.RUNNING
            if chunk.request.first_scheduled_time is None:
                chunk.request.first_scheduled_time = now
        self._in_flight = output if output.chunks else None
        return output

    def _advance(self, output: SchedulerOutput) -> list[Request]:
        """Record that ``output`` ran; returns its requests that are now complete (cancelled
        or failed ones excluded: they were answered when that happened)."""
        if not output.chunks:
            return []
        if output is not self._in_flight:
            raise RuntimeError("the output of a step that is not in flight")
        self._in_flight = None
        completed = []
        for chunk in output.chunks:
            request = chunk.request
            request.num_computed_tokens = chunk.end
            if request.status is not RequestStatus.RUNNING:
                request.release()
                if request is self._chunked:
                    self._chunked = None
            elif chunk.is_last:
                request.finish(RequestStatus.FINISHED)
                completed.append(request)
                if request is self._chunked:
                    self._chunked = None
        return completed

    def update_from_output(self, output: SchedulerOutput,
                           result: RunnerOutput) -> tuple[list[Request], list[Request]]:
        """Record the runner's result of ``output``: the requests it failed are finished as
        failed and released, the others advance. Returns the requests now complete and those
        now failed (one cancelled meanwhile is in neither: it was answered when cancelled)."""
        failed = [request for request, _ in result.failed if self.cancel(request, RequestStatus.FAILED)]
        return self._advance(output), failed

    def _expire(self, now: float) -> list[Request]:
        expired = [r for r in self._waiting if r.expired(now)]
        if expired:
            self._waiting = [r for r in self._waiting if not r.expired(now)]
        if self._chunked is not None and self._chunked.expired(now):
            expired.append(self._chunked)
            self._chunked = None
        for request in expired:
            request.finish(RequestStatus.EXPIRED)
        return expired

    def _schedule_chunk(self, output: SchedulerOutput) -> None:
        request = self._chunked
        start = request.num_computed_tokens
        end = request.num_tokens
        if self.split_long:
            end = min(end, start + self.config.batch_tokens)
        output.chunks.append(ScheduledChunk(request, start, end))
        output.is_chunk_step = True

    def _schedule_packed(self, output: SchedulerOutput) -> None:
        budget, max_seqs = self.config.batch_tokens, self.config.max_seqs
        taken: set[int] = set()
        skipped = 0
        for position, request in enumerate(self._waiting):
            if len(output.chunks) == max_seqs or budget == 0 or skipped > LOOKAHEAD:
                break
            if request.num_tokens > self.config.batch_tokens:
                if self._chunked is None:  # the next long request starts its chunks
                    self._chunked = request
                    request.status = RequestStatus.RUNNING
                    taken.add(position)
                else:
                    skipped += 1
            elif request.num_tokens <= budget:
                output.chunks.append(ScheduledChunk(request, 0, request.num_tokens))
                budget -= request.num_tokens
                taken.add(position)
            else:
                skipped += 1
        if taken:
            self._waiting = [r for k, r in enumerate(self._waiting) if k not in taken]

    def _chunk_in_flight(self) -> bool:
        return self._in_flight is not None and self._in_flight.is_chunk_step

    def _is_in_flight(self, request: Request) -> bool:
        return self._in_flight is not None and any(c.request is request for c in self._in_flight.chunks)
