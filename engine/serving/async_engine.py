"""The serving loop: an asyncio API over the engine core.

Samples are submitted with the name of a resident reference and answered one by one as their
step completes (value, optional per-token contributions, token count, queue and compute
latency). References are built from validation samples through the same loop, merged,
replaced atomically (a request uses the reference it was admitted with), listed and dropped.

One loop task runs ``EngineCore.step()`` in one worker thread, so the event loop stays
responsive, and maps each step's output to the callers' futures. The waiting queue is
bounded: ``submit`` raises EngineOverloaded when it is full (``score_stream`` and reference
builds wait for room). Every admitted request gets exactly one result: a value, or an error
(bad sample, unknown reference, cancelled, deadline exceeded, internal failure).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..config import ValuationConfig
from ..core.engine_core import BuildTask, EngineCore, ScoreTask
from ..core.request import Request
from ..core.runner import ModelRunner
from ..core.scheduler import QueueFull
from ..inputs.samples import SampleError, sample_id_of
from ..model.loading import ValuationModel
from ..outputs import EngineStats, Finished, ReferenceInfo, ScoreResult, StepOutput, TokenValues
from ..valuation.precondition import Covariance, resolve_damping
from ..valuation.reference import OWN_SAMPLES, Reference
from ..valuation.scoring import ReferenceBuilder
from .answers import Build, ScoreHandle, Waiter, latencies
from .metrics import EngineMetrics, prometheus_text
from .registry import ReferenceRegistry

T = TypeVar("T")


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later (gRPC: RESOURCE_EXHAUSTED)."""


class EngineClosed(RuntimeError):
    """The engine is draining or stopped and takes no new work (gRPC: UNAVAILABLE)."""


class AsyncEngine:
    """Continuous-batching valuation server on one resident model.

    Options are ValuationConfig's (``config=``, or its field names as keywords), with the
    serving defaults of ``forvalue serve``: ``policy`` "fcfs" or "priority" (lower
    ``priority`` runs first); ``max_waiting`` bounds the waiting queue; ``max_queue_delay``
    (seconds): after a step that answered requests, wait this long before the next one, so
    that callers who send their next sample when they get a result (a round trip later) join
    the next step rather than the one after it.
    """

    def __init__(self, model: ValuationModel, config: ValuationConfig | None = None, **options: Any) -> None:
        self.config = (config or ValuationConfig.for_command("serve")).replace(**options)
        self.core = EngineCore(model, self.config)
        self.model = self.core.model
        self.registry = ReferenceRegistry(self.core.math)
        self.default_covariance = OWN_SAMPLES
        # Every admitted request, with what its answer goes to: a caller's future, or a build.
        self._requests: dict[int, tuple[Request, Waiter | Build]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forvalue-forward")
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._accepting = True
        self._metrics = EngineMetrics()

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

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
        if not self.core.has_room():  # before encoding: an overloaded server does no work
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
        request, _ = self._requests.get(request_id, (None, None))
        if request is None or not self.core.cancel(request):
            return False
        self._answer_error(request, "cancelled", "cancelled")
        self._room.set()
        return True

    # ------------------------------------------------------------------ references

    async def build_reference(self, name: str, samples: Iterable[Any], *, normalize: str | None = None,
                              merge: bool = False, precondition: str | None = None,
                              damping: float | None = None, covariance: str | None = None) -> ReferenceInfo:
        """Build a reference from validation samples through the serving loop, then install it
        under ``name`` (replacing, or with ``merge=True`` merging into, the current one). Bad
        samples are skipped and counted. Options left None take the engine's: ``normalize``,
        ``precondition`` ("none" or "input") and ``damping`` from its config, ``covariance``
        ("valid": ``A`` from these samples, or the name of a covariance given to
        ``put_covariance``) from ``default_covariance``."""
        config = self.reference_config(normalize, precondition, damping)
        self._check_accepting()
        source = self.default_covariance if covariance is None else covariance
        external = None if config.precondition is None or source == OWN_SAMPLES \
            else self.registry.covariance(source)
        damping = resolve_damping(config.precondition, config.damping, from_pool=external is not None)
        build = Build(ReferenceBuilder(self.core.math, config.normalize, self.config.loss_on,
                                        config.precondition, damping, external))
        for index, sample in enumerate(samples):
            await self._wait_for_room()
            try:
                request = self._make_request(sample, f"reference {name!r} index {index}",
                                             BuildTask(build.builder))
            except SampleError:
                build.skipped += 1
                continue
            build.pending += 1
            self._enqueue(request, build)
        build.submitted_all = True
        if build.pending:
            await build.done.wait()
        reference = await asyncio.get_running_loop().run_in_executor(
            self._executor, build.builder.finish, build.skipped)
        return self.put_reference(name, reference, merge=merge)

    async def on_forward_thread(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` on the thread that runs the engine's steps, between two
        steps: work that runs the model outside the engine (an index query) never overlaps a
        step, whose hooks and buffers it shares."""
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def reference_config(self, normalize: str | None, precondition: str | None,
                          damping: float | None) -> ValuationConfig:
        """A reference build's options: those given, else the engine's (a damping only goes
        with a preconditioner)."""
        precondition = self.config.precondition if precondition is None else precondition
        if precondition in (None, "none"):
            damping = None
        elif damping is None:
            damping = self.config.damping
        return ValuationConfig(normalize=normalize or self.config.normalize, precondition=precondition,
                               damping=damping)

    def put_reference(self, name: str, reference: Reference, *, merge: bool = False) -> ReferenceInfo:
        """Install a built or loaded reference under ``name``, atomically: requests admitted
        before keep the reference they were admitted with. Raises ReferenceMismatch when it
        was built with another model or tokenizer."""
        return self.registry.put(name, reference, merge=merge)

    def put_covariance(self, name: str, covariance: Covariance, *, default: bool = False) -> None:
        """Make a covariance (``forvalue covariance``) available to reference builds under
        ``name``; ``default``: builds that name none use it."""
        self.registry.put_covariance(name, covariance, self.config.loss_on)
        if default:
            self.default_covariance = name

    def references(self) -> list[ReferenceInfo]:
        return self.registry.infos()

    def get_reference(self, name: str) -> Reference | None:
        resident = self.registry.get(name)
        return None if resident is None else resident.reference.reference

    def drop_reference(self, name: str) -> bool:
        """Forget ``name``; requests already admitted with it are still scored."""
        return self.registry.drop(name)

    # ------------------------------------------------------------------ stats

    def stats(self) -> EngineStats:
        return self._metrics.snapshot(self.core.scheduler.num_waiting, self.core.scheduler.num_running,
                                      len(self.registry))

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
        while not self.core.has_room():
            self._room.clear()
            await self._room.wait()
            self._check_accepting()

    def _admit(self, sample: Any, where: str, reference: str, priority: int, timeout: float | None,
               token_values: bool) -> ScoreHandle:
        waiter = Waiter(reference, asyncio.get_running_loop().create_future())
        resident = self.registry.get(reference)
        try:
            task = ScoreTask(None if resident is None else resident.reference, token_values)
            request = self._make_request(sample, where, task, priority, timeout)
        except SampleError as error:
            return self._refuse(waiter, sample_id_of(sample, ""), str(error))
        if resident is None:
            return self._refuse(waiter, request.sample.id,
                                f"unknown reference {reference!r}; resident: {self.registry.names()}")
        self._enqueue(request, waiter)
        return ScoreHandle(request.request_id, waiter.future)

    def _refuse(self, waiter: Waiter, sample_id: str, error: str) -> ScoreHandle:
        """A sample that never became a request: answered at once with its error."""
        self._metrics.count("failed")
        waiter.future.set_result(ScoreResult(sample_id, waiter.reference, error=error))
        return ScoreHandle(-1, waiter.future)

    def _make_request(self, sample: Any, where: str, task: ScoreTask | BuildTask, priority: int = 0,
                      timeout: float | None = None) -> Request:
        """A request ready to queue; raises SampleError when the sample cannot be one."""
        encoded = self.core.encode(sample, where=where)
        deadline = None if timeout is None else time.monotonic() + timeout
        return Request(encoded, priority=priority, deadline=deadline, task=task)

    def _overloaded(self) -> None:
        self._metrics.count("overloaded")
        raise EngineOverloaded(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")

    def _enqueue(self, request: Request, owner: Waiter | Build) -> None:
        try:
            self.core.add_request(request)
        except QueueFull:
            self._overloaded()
        self._requests[request.request_id] = (request, owner)
        self._metrics.count("admitted")
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.core.has_unfinished():
                if not self._accepting:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            output = await loop.run_in_executor(self._executor, self.core.step)
            self._room.set()
            self._answer_step(output)
            if not output.num_tokens:
                await asyncio.sleep(0)  # only expired requests: let submitters run
            elif self.config.max_queue_delay and output.answered_any:
                await asyncio.sleep(self.config.max_queue_delay)

    def _answer_step(self, output: StepOutput) -> None:
        if output.num_tokens:
            self._metrics.step(output.num_tokens, output.seconds)
        for request in output.expired:
            self._answer_error(request, "deadline exceeded before the sample was valued", "expired")
        for request, reason in output.failed:
            self._answer_error(request, reason, "failed")
        for item in output.finished:
            self._answer(item.request, item)

    def _waiter(self, request: Request, *, succeeded: bool) -> Waiter | None:
        """The caller waiting for ``request``'s result, once; None when a reference build takes
        it (settled here) or it was answered already."""
        _, owner = self._requests.pop(request.request_id, (None, None))
        if isinstance(owner, Build):
            owner.settle(succeeded=succeeded)
            return None
        return owner

    def _answer(self, request: Request, item: Finished) -> None:
        waiter = self._waiter(request, succeeded=True)
        if waiter is None:
            return
        token_values = isinstance(request.task, ScoreTask) and request.task.token_values
        tokens = TokenValues.of(item.states, item.token_scores) if token_values else None
        result = ScoreResult(request.sample.id, waiter.reference, value=item.value,
                             num_tokens=request.num_tokens, num_labels=len(item.states.positions),
                             truncated=request.sample.truncated,
                             token_values=tokens, **latencies(request), request_id=request.request_id)
        waiter.answer(result, "scored", self._metrics)

    def _answer_error(self, request: Request, message: str, outcome: str) -> None:
        waiter = self._waiter(request, succeeded=False)
        if waiter is None:
            return
        result = ScoreResult(request.sample.id, waiter.reference, error=message,
                             num_tokens=request.num_tokens, truncated=request.sample.truncated,
                             **latencies(request), request_id=request.request_id)
        waiter.answer(result, outcome, self._metrics)
