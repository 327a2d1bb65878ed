"""The serving loop: an asyncio API over the scheduler and the model runner.

Samples are submitted with the name of a resident reference and answered one by one as their
step completes (value, optional per-token contributions, token count, queue and compute
latency). References are built from validation samples through the same loop, merged,
replaced atomically (a request uses the reference it was admitted with), listed and dropped.

One loop task owns the scheduler; the forward pass and the kernels run in one worker thread,
so the event loop stays responsive. The waiting queue is bounded: ``submit`` raises
EngineOverloaded when it is full (``score_stream`` and reference builds wait for room).
Every admitted request gets exactly one result: a value, or an error (bad sample, unknown
reference, cancelled, deadline exceeded, internal failure).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .label_math import LabelMath
from .model import ValuationModel
from .reference import NORMALIZATIONS, Reference
from .request import Request, RequestStatus
from .runner import LabelStates, ModelRunner
from .samples import SampleError, encode_sample
from .scheduler import QueueFull, RequestTooLong, Scheduler, SchedulerConfig, SchedulerOutput
from .valuator import TokenValues

# Latency percentiles and tokens/s are taken over this many recent results / seconds.
LATENCY_WINDOW = 2048
THROUGHPUT_WINDOW_S = 30.0
QUANTILES = (0.5, 0.9, 0.99)


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later (gRPC: RESOURCE_EXHAUSTED)."""


class EngineClosed(RuntimeError):
    """The engine is draining or stopped and takes no new work (gRPC: UNAVAILABLE)."""


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


@dataclass(frozen=True)
class ScoreHandle:
    """An admitted request: ``await handle`` gives its ScoreResult."""

    request_id: int
    future: asyncio.Future

    def __await__(self) -> Any:
        return self.future.__await__()


@dataclass
class _ResidentReference:
    info: ReferenceInfo
    reference: Reference
    mean_gradient: torch.Tensor  # Gbar on the model's device, built once


@dataclass
class _ScoreTask:
    reference: _ResidentReference
    token_values: bool
    future: asyncio.Future


@dataclass
class _ReferenceBuilder:
    """Accumulates ``sum_b G(b) / norm(b)``; the worker thread adds, the loop counts."""

    normalize: str
    total: torch.Tensor
    count: int = 0
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


@dataclass
class _BuildTask:
    builder: _ReferenceBuilder


class AsyncEngine:
    """Continuous-batching valuation server on one resident model.

    ``policy``: "fcfs" or "priority" (lower ``priority`` runs first). ``max_waiting`` bounds
    the waiting queue. ``max_queue_delay`` (seconds): after a step that answered requests,
    wait this long before the next one, so that callers who send their next sample when they
    get a result (a round trip later) join the next step rather than the one after it. The
    other options are those of Valuator (how samples are labelled) and of the scheduler and
    runner.
    """

    def __init__(self, model: ValuationModel, *, loss_on: str = "response", append_eos: bool = False,
                 max_length: int | None = None, max_batch_tokens: int = 2048, max_seqs: int = 128,
                 max_waiting: int = 1024, policy: str = "fcfs", attention: str = "auto",
                 backend: str = "auto", max_queue_delay: float = 0.0) -> None:
        if max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must be >= 0 seconds, got {max_queue_delay}")
        self.model = model
        self.max_queue_delay = max_queue_delay
        self.loss_on = loss_on
        self.runner = ModelRunner(model, attention=attention, batch_tokens=max_batch_tokens)
        self.math = LabelMath(model, backend)
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, max_model_len=model.context_length,
            policy=policy, max_waiting=max_waiting))
        self._encode_options = {"loss_on": loss_on, "append_eos": append_eos, "max_length": max_length,
                                "context_length": model.context_length}
        self._references: dict[str, _ResidentReference] = {}
        self._versions: dict[str, int] = {}
        self._requests: dict[int, Request] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forvalue-forward")
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._accepting = True
        self._metrics = _Metrics()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsyncEngine:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def _ensure_started(self) -> None:
        if self._loop_task is None:
            self._wake, self._room = asyncio.Event(), asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="forvalue-engine")

    async def drain(self) -> None:
        """Stop taking new work and return once everything admitted has been answered."""
        self._accepting = False
        if self._loop_task is not None:
            self._wake.set()
            await asyncio.shield(self._loop_task)

    async def close(self) -> None:
        """Drain, then release the worker thread."""
        await self.drain()
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ scoring

    def submit(self, sample: Any, reference: str, *, priority: int = 0, timeout: float | None = None,
               token_values: bool = False) -> ScoreHandle:
        """Admit one sample; raises EngineOverloaded when the waiting queue is full and
        EngineClosed when draining. Problems of the sample itself come back as its result."""
        self._check_accepting()
        if not self.scheduler.has_room():  # before encoding: an overloaded server does no work
            self._overloaded()
        return self._admit(sample, "request", reference, priority, timeout, token_values)

    async def score(self, sample: Any, reference: str, *, priority: int = 0, timeout: float | None = None,
                    token_values: bool = False) -> ScoreResult:
        """Submit one sample and wait for its result; cancelling the caller cancels it."""
        handle = self.submit(sample, reference, priority=priority, timeout=timeout, token_values=token_values)
        try:
            return await asyncio.shield(handle.future)
        except asyncio.CancelledError:
            self.cancel(handle.request_id)
            raise

    async def score_stream(self, samples: Iterable[Any], reference: str, *, priority: int = 0,
                           timeout: float | None = None,
                           token_values: bool = False) -> AsyncIterator[ScoreResult]:
        """Results in completion order; submission waits for room in the queue instead of
        failing (backpressure). Leaving the loop early cancels what is still pending."""
        results: asyncio.Queue[ScoreResult] = asyncio.Queue()
        handles: list[ScoreHandle] = []

        async def submit_all() -> None:
            for index, sample in enumerate(samples):
                await self._wait_for_room()
                handle = self._admit(sample, f"stream index {index}", reference, priority, timeout,
                                     token_values)
                handle.future.add_done_callback(lambda f: results.put_nowait(f.result()))
                handles.append(handle)

        producer = asyncio.get_running_loop().create_task(submit_all())
        delivered = 0
        try:
            while not producer.done():  # results, while submission may still be waiting
                getter = asyncio.ensure_future(results.get())
                await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    delivered += 1
                    yield getter.result()
                else:
                    getter.cancel()  # an item it did not take stays in the queue
            producer.result()  # re-raise a failed submission (e.g. EngineClosed)
            for _ in range(len(handles) - delivered):
                yield await results.get()
        finally:
            producer.cancel()
            for handle in handles:
                self.cancel(handle.request_id)

    def cancel(self, request_id: int) -> bool:
        """Cancel an admitted request; its result becomes a "cancelled" error. False when it
        was already answered."""
        request = self._requests.get(request_id)
        if request is None or not self.scheduler.cancel(request):
            return False
        self._answer_error(request, "cancelled", "cancelled")
        self._room.set()
        return True

    # ------------------------------------------------------------------ references

    async def build_reference(self, name: str, samples: Iterable[Any], *, normalize: str = "none",
                              merge: bool = False) -> ReferenceInfo:
        """Build a reference from validation samples through the serving loop, then install it
        under ``name`` (replacing, or with ``merge=True`` merging into, the current one). Bad
        samples are skipped and counted."""
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self._check_accepting()
        builder = _ReferenceBuilder(normalize, torch.zeros(self.model.head_weight.shape,
                                                           dtype=self.math.dtype,
                                                           device=self.model.device))
        for index, sample in enumerate(samples):
            await self._wait_for_room()
            request = self._make_request(sample, f"reference {name!r} index {index}",
                                         _BuildTask(builder))
            if isinstance(request, str):
                builder.skipped += 1
                continue
            builder.pending += 1
            self._enqueue(request)
        builder.submitted_all = True
        if builder.pending:
            await builder.done.wait()
        if builder.count == 0:
            raise ValueError(f"reference {name!r}: no valid validation sample "
                             f"({builder.skipped} skipped)")
        info = {"loss_on": self.loss_on, "skipped": str(builder.skipped)}
        reference = Reference(builder.total.cpu(), builder.count, normalize, dict(self.model.identity), info)
        return self.put_reference(name, reference, merge=merge)

    def put_reference(self, name: str, reference: Reference, *, merge: bool = False) -> ReferenceInfo:
        """Install a built or loaded reference under ``name``, atomically: requests admitted
        before keep the reference they were admitted with. Raises ReferenceMismatch when it
        was built with another model or tokenizer."""
        reference.check_compatible(self.model.identity, reference.normalize)
        skipped = int(reference.info.get("skipped", 0))
        current = self._references.get(name)
        if merge and current is not None:
            reference = current.reference.merge(reference)
        self._versions[name] = self._versions.get(name, 0) + 1
        info = ReferenceInfo(name, reference.count, reference.normalize,
                             reference.info.get("loss_on", ""), skipped, self._versions[name])
        mean = reference.mean().to(device=self.model.device, dtype=self.math.dtype)
        self._references[name] = _ResidentReference(info, reference, mean)
        return info

    def references(self) -> list[ReferenceInfo]:
        return [resident.info for resident in self._references.values()]

    def get_reference(self, name: str) -> Reference | None:
        resident = self._references.get(name)
        return None if resident is None else resident.reference

    def drop_reference(self, name: str) -> bool:
        """Forget ``name``; requests already admitted with it are still scored."""
        return self._references.pop(name, None) is not None

    # ------------------------------------------------------------------ stats

    def stats(self) -> EngineStats:
        return self._metrics.snapshot(self.scheduler.num_waiting, self.scheduler.num_running,
                                      len(self._references))

    def prometheus_text(self) -> str:
        """The stats in Prometheus' text exposition format."""
        return prometheus_text(self.stats())

    # ------------------------------------------------------------------ admission

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise EngineClosed("the engine is draining or stopped")
        self._ensure_started()

    async def _wait_for_room(self) -> None:
        self._check_accepting()
        while not self.scheduler.has_room():
            self._room.clear()
            await self._room.wait()
            self._check_accepting()

    def _admit(self, sample: Any, where: str, reference: str, priority: int, timeout: float | None,
               token_values: bool) -> ScoreHandle:
        future = asyncio.get_running_loop().create_future()
        resident = self._references.get(reference)
        task = _ScoreTask(resident, token_values, future)
        request = self._make_request(sample, where, task, priority, timeout)
        if isinstance(request, str):
            self._metrics.count("failed")
            future.set_result(ScoreResult(_sample_id(sample), reference, error=request))
            return ScoreHandle(-1, future)
        if resident is None:
            self._metrics.count("failed")
            future.set_result(ScoreResult(request.sample.id, reference, error=f"unknown reference "
                                          f"{reference!r}; resident: {sorted(self._references)}"))
            return ScoreHandle(-1, future)
        self._enqueue(request)
        return ScoreHandle(request.request_id, future)

    def _make_request(self, sample: Any, where: str, task: Any, priority: int = 0,
                      timeout: float | None = None) -> Request | str:
        """A request ready to queue, or why the sample cannot be one."""
        try:
            encoded = encode_sample(sample, self.model.tokenizer, where=where, **self._encode_options)
        except SampleError as error:
            return str(error)
        unknown_ids = self.runner.check_sample(encoded)
        if unknown_ids is not None:
            return str(unknown_ids)
        limit = self.scheduler.config.max_model_len
        if limit is not None and len(encoded.input_ids) > limit:
            return str(RequestTooLong(f"{encoded.id}: {len(encoded.input_ids)} tokens, the model "
                                      f"accepts at most {limit}"))
        deadline = None if timeout is None else time.monotonic() + timeout
        return Request(encoded, priority=priority, deadline=deadline, task=task)

    def _overloaded(self) -> None:
        self._metrics.count("overloaded")
        raise EngineOverloaded(f"the waiting queue is full ({self.scheduler.config.max_waiting} "
                               f"requests); retry later")

    def _enqueue(self, request: Request) -> None:
        try:
            self.scheduler.add(request)
        except QueueFull:
            self._overloaded()
        self._requests[request.request_id] = request
        self._metrics.count("admitted")
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.scheduler.has_unfinished():
                if not self._accepting:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            step = self.scheduler.schedule()
            self._room.set()
            for request in step.expired:
                self._answer_error(request, "deadline exceeded before the sample was valued", "expired")
            if not step.chunks:
                await asyncio.sleep(0)  # only expired requests: let submitters run
                continue
            started = time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._execute, step)
            except Exception as failure:  # a bug or out of memory: answer the step, keep serving
                outcomes = {chunk.request: f"internal error: {failure!r}" for chunk in step.chunks}
            self._metrics.step(step.num_tokens, time.monotonic() - started)
            self._settle(step, outcomes)
            if self.max_queue_delay and any(chunk.is_last for chunk in step.chunks):
                await asyncio.sleep(self.max_queue_delay)

    def _execute(self, step: SchedulerOutput) -> dict[Request, Any]:
        """Worker thread: the forward pass, then the kernels for the requests it completed."""
        outcomes = dict(self.runner.execute(step))
        states = [(request, s) for request, s in outcomes.items() if isinstance(s, LabelStates)]
        for group in _group_by(states, lambda item: id(item[0].task.reference)
                               if isinstance(item[0].task, _ScoreTask) else None):
            self._score_group(group, outcomes)
        for group in _group_by(states, lambda item: id(item[0].task.builder)
                               if isinstance(item[0].task, _BuildTask) else None):
            self._accumulate_group(group)
        return outcomes

    def _score_group(self, group: list[tuple[Request, LabelStates]], outcomes: dict[Request, Any]) -> None:
        resident = group[0][0].task.reference
        per_token = self.math.token_scores([s for _, s in group], resident.mean_gradient)
        for (request, states), scores in zip(group, per_token, strict=True):
            scores = scores / self.math.norm(states, resident.reference.normalize)
            outcomes[request] = (float(scores.sum()), scores, states)

    def _accumulate_group(self, group: list[tuple[Request, LabelStates]]) -> None:
        builder = group[0][0].task.builder
        weights = [1.0 / self.math.norm(states, builder.normalize) for _, states in group]
        builder.total += self.math.gradient_sum([s for _, s in group], weights)
        builder.count += len(group)

    def _settle(self, step: SchedulerOutput, outcomes: dict[Request, Any]) -> None:
        """Back on the loop: answer failures, advance the scheduler, answer completions."""
        for request, outcome in outcomes.items():
            failed = isinstance(outcome, (SampleError, str))
            if failed and self.scheduler.cancel(request, RequestStatus.FAILED):
                self._answer_error(request, str(outcome), "failed")
        for request in self.scheduler.update(step):
            request.finish(RequestStatus.FINISHED)
            self._answer(request, outcomes[request])

    def _answer(self, request: Request, outcome: Any) -> None:
        self._requests.pop(request.request_id, None)
        task = request.task
        if isinstance(task, _BuildTask):
            task.builder.settle(succeeded=True)
            return
        value, scores, states = outcome
        tokens = _token_values(states, scores) if task.token_values else None
        result = ScoreResult(request.sample.id, task.reference.info.name, value=value,
                             num_tokens=request.num_tokens, num_labels=len(states.positions),
                             truncated=request.sample.truncated, token_values=tokens,
                             **_latencies(request), request_id=request.request_id)
        self._metrics.result("scored", result)
        if not task.future.done():
            task.future.set_result(result)

    def _answer_error(self, request: Request, message: str, outcome: str) -> None:
        self._requests.pop(request.request_id, None)
        task = request.task
        if isinstance(task, _BuildTask):
            task.builder.settle(succeeded=False)
            return
        result = ScoreResult(request.sample.id, task.reference.info.name, error=message,
                             num_tokens=request.num_tokens, truncated=request.sample.truncated,
                             **_latencies(request), request_id=request.request_id)
        self._metrics.result(outcome, result)
        if not task.future.done():
            task.future.set_result(result)


def prometheus_text(stats: EngineStats) -> str:
    """EngineStats in Prometheus' text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP forvalue_{name} {help_text}", f"# TYPE forvalue_{name} {kind}"])
        lines.extend(f"forvalue_{name}{labels} {value:.9g}" for labels, value in samples)

    metric("waiting_requests", "gauge", "Requests in the waiting queue.", [("", stats.waiting)])
    metric("running_requests", "gauge", "Requests in the step in flight or between chunks.",
           [("", stats.running)])
    metric("references", "gauge", "Resident references.", [("", stats.references)])
    metric("steps_total", "counter", "Forward steps run.", [("", stats.steps)])
    metric("tokens_total", "counter", "Tokens forwarded.", [("", stats.tokens_total)])
    metric("tokens_per_second", "gauge", f"Tokens forwarded per second over the last "
           f"{THROUGHPUT_WINDOW_S:.0f} s.", [("", stats.tokens_per_second)])
    metric("requests_total", "counter", "Requests by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in sorted(stats.requests.items())])
    for phase, quantiles in stats.latency.items():
        metric(f"{phase}_latency_seconds", "summary", f"{phase.capitalize()} latency of recent "
               f"results.", [(f'{{quantile="{q}"}}', v) for q, v in quantiles.items()])
    return "\n".join(lines) + "\n"


class _Metrics:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.tokens_total = 0
        self._recent_steps: deque[tuple[float, int]] = deque()
        self._latency: dict[str, deque[float]] = {phase: deque(maxlen=LATENCY_WINDOW)
                                                  for phase in ("queue", "compute", "total")}

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def step(self, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        self.steps += 1
        self.tokens_total += tokens
        self._recent_steps.append((now, tokens))
        while self._recent_steps and self._recent_steps[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent_steps.popleft()

    def result(self, outcome: str, result: ScoreResult) -> None:
        self.count(outcome)
        if outcome == "scored":
            self._latency["queue"].append(result.queue_seconds)
            self._latency["compute"].append(result.compute_seconds)
            self._latency["total"].append(result.queue_seconds + result.compute_seconds)

    def snapshot(self, waiting: int, running: int, references: int) -> EngineStats:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent_steps if t >= now - THROUGHPUT_WINDOW_S]
        span = now - recent[0][0] if len(recent) > 1 else 0.0
        rate = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        latency = {phase: {q: float(np.quantile(list(values), q)) for q in QUANTILES}
                   for phase, values in self._latency.items() if values}
        return EngineStats(waiting, running, references, self.steps, self.tokens_total, rate,
                           dict(self.counts), latency)


def _latencies(request: Request) -> dict[str, float]:
    now = time.monotonic()
    scheduled = request.first_scheduled_time
    if scheduled is None:
        return {"queue_seconds": now - request.arrival_time, "compute_seconds": 0.0}
    finished = request.finish_time or now
    return {"queue_seconds": scheduled - request.arrival_time, "compute_seconds": finished - scheduled}


def _token_values(states: LabelStates, scores: torch.Tensor) -> TokenValues:
    return TokenValues(np.asarray(states.positions), states.labels.cpu().numpy(),
                       scores.numpy().astype(np.float64))


def _group_by(items: Sequence[Any], key: Any) -> list[list[Any]]:
    groups: dict[Any, list[Any]] = {}
    for item in items:
        k = key(item)
        if k is not None:
            groups.setdefault(k, []).append(item)
    return list(groups.values())


def _sample_id(sample: Any) -> str:
    return str(sample.get("id", "")) if isinstance(sample, dict) else ""
