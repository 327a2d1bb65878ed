"""The two streaming calls of the valuation service, one object per call: ``ScoreStream``
(Score: requests admitted into the engine within a window, results written back as they come)
and ``ReferenceUpload`` (PutReference: samples built in bounded chunks, installed at the end).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from forvalue.engine.index.metadata import parse_where
from forvalue.engine.serving.answers import ScoreHandle
from forvalue.engine.serving.async_engine import AsyncEngine, EngineClosed, EngineOverloaded
from forvalue.engine.valuation.reference import OWN_SAMPLES, Reference

from .. import forvalue_pb2 as pb
from ..wire import REFERENCE_NAME, BadSample, query_result_message, sample_of, score_result_message

if TYPE_CHECKING:
    from forvalue.engine import Index

    from .server import ServerLimits

log = logging.getLogger("forvalue.server")

UNACCEPTED = "requests without a result were not accepted: resend them"
SHUTTING_DOWN = (grpc.StatusCode.UNAVAILABLE, f"the server is shutting down; {UNACCEPTED}")


class Progress:
    """Wakes every waiter whenever a request is answered: room may have opened in the queue."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass


class _Overloaded(Exception):
    pass


class ScoreStream:
    """One Score call. A reader task admits requests into the engine while fewer than
    ``stream_window`` are unanswered; ``run`` yields results in completion order. Leaving
    ``run`` (finished, cancelled, expired, disconnected) cancels what is still queued."""

    def __init__(self, engine: AsyncEngine, limits: ServerLimits, progress: Progress,
                 context: grpc.aio.ServicerContext) -> None:
        self.engine = engine
        self.limits = limits
        self.progress = progress
        self.context = context
        self.status: tuple[grpc.StatusCode, str] | None = None  # how the call must end
        self._window = asyncio.Semaphore(self.limits.stream_window)
        self._results: asyncio.Queue[pb.ScoreResult | None] = asyncio.Queue()  # None: reader done
        self._pending: dict[int, ScoreHandle] = {}  # admitted, not yet answered by the engine
        self._unanswered = 0  # accepted, result not yet written
        self._reader: asyncio.Task | None = None
        self._stopping = False  # draining: accept nothing more

    async def run(self, requests: AsyncIterator[pb.ScoreRequest]) -> AsyncIterator[pb.ScoreResult]:
        self._reader = asyncio.get_running_loop().create_task(self._read(requests))
        reading = True
        try:
            while reading or self._unanswered:
                result = await self._results.get()
                if result is None:
                    reading = False
                    continue
                yield result  # returns once written: one write at a time is the backpressure
                self._unanswered -= 1
                self._window.release()
                if self._stopping and not self._unanswered:
                    self._reader.cancel()  # everything accepted is answered; the end never came
        finally:
            self._reader.cancel()
            for request_id in list(self._pending):
                self.engine.cancel(request_id)

    def stop_reading(self) -> None:
        """Drain: accept nothing more; what was accepted is still answered. Until then the
        reader goes on, so that a caller who had already sent its end (half-closed) gets OK,
        not UNAVAILABLE, whenever that end reaches the server."""
        self._stopping = True
        if self._reader is not None and not self._unanswered:
            self._reader.cancel()

    async def _read(self, requests: AsyncIterator[pb.ScoreRequest]) -> None:
        try:
            while True:
                await self._window.acquire()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                if self._stopping:  # sent after the drain began: not accepted
                    self.status = SHUTTING_DOWN
                    return
                await self._accept(request)
        except asyncio.CancelledError:
            self.status = SHUTTING_DOWN
            raise
        except _Overloaded:
            self.status = (grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is overloaded (its queue "
                           f"stayed full for {self.limits.queue_timeout:g} s); {UNACCEPTED} later")
        except EngineClosed:
            self.status = SHUTTING_DOWN
        except Exception as error:  # a bug: end the call, keep serving others
            log.exception("reading a Score stream failed")
            self.status = (grpc.StatusCode.INTERNAL, f"internal error: {error!r}; {UNACCEPTED}")
        finally:
            self._results.put_nowait(None)

    async def _accept(self, request: pb.ScoreRequest) -> None:
        try:
            sample = sample_of(request)
        except BadSample as error:
            self._unanswered += 1
            self._results.put_nowait(pb.ScoreResult(id=request.id, reference=request.reference,
                                                    value=math.nan, error=str(error)))
            return
        handle = await self._submit(sample, request)
        self._unanswered += 1
        if handle.request_id >= 0:
            self._pending[handle.request_id] = handle
        handle.future.add_done_callback(functools.partial(self._answered, request.id, handle.request_id))

    async def _submit(self, sample: Any, request: pb.ScoreRequest) -> ScoreHandle:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.limits.queue_timeout
        while True:
            try:
                return self.engine.submit(sample, request.reference, priority=request.priority,
                                          timeout=self.context.time_remaining(),
                                          token_values=request.token_values)
            except EngineOverloaded:
                if loop.time() >= give_up:
                    self._window.release()
                    raise _Overloaded from None
                await self.progress.wait(give_up - loop.time())

    def _answered(self, client_id: str, request_id: int, future: asyncio.Future) -> None:
        self._pending.pop(request_id, None)
        self.progress.notify()
        self._results.put_nowait(score_result_message(future.result(), client_id))


class CallError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReferenceUpload:
    """PutReference: samples are built in bounded chunks under a hidden name, summed, and
    installed under the real name only when the upload is complete (atomic for scorers).

    A cosine reference preconditioned with its own samples' ``A`` needs ``A`` before any norm:
    its samples are kept until the upload ends and built in one pass then."""

    def __init__(self, engine: AsyncEngine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.name = ""
        self.options: dict[str, Any] = {}
        self.merge = False
        self.total: Reference | None = None
        self.skipped = 0
        self._chunk: list[Any] = []
        self._chunk_bytes = 0
        self._whole = False  # build everything at the end (see above)
        self._hidden = f".upload-{uuid.uuid4().hex}"  # REFERENCE_NAME never matches it

    async def add(self, message: pb.ReferenceSample) -> None:
        if not self.name:
            self._header(message)
        elif message.name and message.name != self.name:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"one upload builds one reference: got {message.name!r} after {self.name!r}")
        try:
            self._chunk.append(sample_of(message))
        except BadSample:
            self.skipped += 1
        self._chunk_bytes += message.ByteSize()
        if not self._whole and (len(self._chunk) >= self.limits.reference_chunk
                                or self._chunk_bytes >= self.limits.reference_chunk_bytes):
            await self._build_chunk()

    def _header(self, message: pb.ReferenceSample) -> None:
        if not REFERENCE_NAME.fullmatch(message.name):
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"bad reference name {message.name!r}: use letters, digits and _.:- "
                            f"(at most 128, starting with a letter or digit)")
        options = {"normalize": message.normalize or "none", "precondition": message.precondition or None,
                   "damping": message.damping or None, "covariance": message.covariance or None}
        try:  # the options are checked now, before any sample is built
            config = self.engine.reference_config(options["normalize"], options["precondition"],
                                                   options["damping"])
            covariance = options["covariance"] or self.engine.default_covariance
            if config.precondition is not None and covariance != OWN_SAMPLES:
                self.engine.registry.covariance(covariance)
        except ValueError as error:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        self.name, self.options, self.merge = message.name, options, message.merge
        self._whole = config.precondition is not None and config.normalize == "cosine" \
            and covariance == OWN_SAMPLES

    async def _build_chunk(self) -> None:
        chunk, self._chunk, self._chunk_bytes = self._chunk, [], 0
        try:
            info = await self.engine.build_reference(self._hidden, chunk, **self.options)
            part = self.engine.get_reference(self._hidden)
        except EngineClosed:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down") from None
        except ValueError:  # no valid sample in this chunk (the options were checked before)
            self.skipped += len(chunk)
            return
        finally:
            self.engine.drop_reference(self._hidden)
        self.skipped += info.skipped
        self.total = part if self.total is None else self.total.merge(part)

    async def finish(self) -> Any:
        if not self.name:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "an upload needs at least one sample")
        if self._chunk:
            await self._build_chunk()
        if self.total is None:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"reference {self.name!r}: no valid validation sample ({self.skipped} skipped)")
        reference = dataclasses.replace(self.total, info={**self.total.info, "skipped": str(self.skipped)})
        try:
            return self.engine.put_reference(self.name, reference, merge=self.merge)
        except ValueError as error:  # ReferenceMismatch: merging into another normalisation
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None


async def answer_query(engine: AsyncEngine, index: Index, request: pb.QueryRequest) -> pb.QueryResult:
    """One Query request: the index's answer for its sample (the target's forward pass and the
    scan run on the engine's forward thread, between steps), or its error."""
    started = time.perf_counter()
    try:
        sample = sample_of(request)
        where = parse_where(request.where)
        answer = (await engine.on_forward_thread(index.query, [sample], top=request.top or 10,
                                                 where=where))[0]
    except (BadSample, ValueError) as error:  # a SampleError, or no usable label
        answer = {"error": str(error)}
    return query_result_message(request.id, answer, time.perf_counter() - started)
