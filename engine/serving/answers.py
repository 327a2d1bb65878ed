"""What an admitted request's answer goes to, kept by the serving loop (never by the core): a
caller's future (``Waiter``, handed out as a ``ScoreHandle``), or a reference being built
(``Build``); and the latencies a result reports."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.request import Request
from ..outputs import ScoreResult
from ..valuation.scoring import ReferenceBuilder
from .metrics import EngineMetrics


@dataclass(frozen=True)
class ScoreHandle:
    """An admitted request: ``await handle`` gives its ScoreResult."""

    request_id: int
    future: asyncio.Future

    def __await__(self) -> Any:
        return self.future.__await__()


@dataclass(frozen=True)
class Waiter:
    """A caller waiting for one sample's result against ``reference``."""

    reference: str
    future: asyncio.Future

    def answer(self, result: ScoreResult, outcome: str, metrics: EngineMetrics) -> None:
        metrics.result(outcome, result)
        if not self.future.done():  # the caller may have gone
            self.future.set_result(result)


@dataclass
class Build:
    """A reference build in progress: the loop counts answers, the worker accumulates."""

    builder: ReferenceBuilder
    skipped: int = 0
    pending: int = 0
    submitted_all: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self, succeeded: bool) -> None:
        self.pending -= 1
        if not succeeded:
            self.skipped += 1
        if self.submitted_all and self.pending == 0:
            self.done.set()


def latencies(request: Request) -> dict[str, float]:
    now = time.monotonic()
    scheduled = request.first_scheduled_time
    if scheduled is None:
        return {"queue_seconds": now - request.arrival_time, "compute_seconds": 0.0}
    finished = request.finish_time or now
    return {"queue_seconds": scheduled - request.arrival_time, "compute_seconds": finished - scheduled}
