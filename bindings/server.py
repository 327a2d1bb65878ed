"""The gRPC valuation server (``forvalue serve``): grpc.aio on the async engine.

One resident model, references built at start-up (``NAME=FILE``) or streamed in later
(``PutReference``), and a bidirectional ``Score`` stream per caller. What keeps it standing
under bad clients:

- every request read from a stream gets exactly one result (a value or an ``error``), and a
  stream never has more than ``stream_window`` requests read and not yet written back: past
  that the server stops reading and HTTP/2 flow control holds the client;
- the engine's waiting queue is bounded; a stream that finds it full waits up to
  ``queue_timeout`` for room, then ends with RESOURCE_EXHAUSTED after answering what it had
  accepted (never unbounded queueing);
- a cancelled, expired or disconnected call cancels its queued requests in the engine;
- streams beyond ``max_streams``, oversize messages: RESOURCE_EXHAUSTED; a missing or wrong
  bearer token: UNAUTHENTICATED on every call; loading or draining: UNAVAILABLE;
- only JSON and protobuf come off the wire (no pickle, no code, no file paths).

Health (``grpc.health.v1``) says SERVING only once the model and the start-up references are
resident. SIGTERM (or SIGINT) drains: health turns NOT_SERVING, new calls get UNAVAILABLE,
open streams stop reading, everything accepted is answered, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import json
import logging
import math
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from forvalue.engine import Reference, ValuationModel, load_model
from forvalue.engine.async_engine import AsyncEngine, EngineClosed, EngineOverloaded, ScoreHandle
from forvalue.engine.async_engine import ScoreResult as EngineResult
from forvalue.engine.readers import read_samples
from forvalue.engine.reference import NORMALIZATIONS

from . import forvalue_pb2 as pb
from . import forvalue_pb2_grpc as pb_grpc
from .cli import user_error

log = logging.getLogger("forvalue.server")

DEFAULT_PORT = 50051
DEFAULT_QUEUE_DELAY_MS = 2.0  # about a loopback gRPC round trip; small next to a step
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Valuation"].full_name
REFERENCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
UNACCEPTED = "requests without a result were not accepted: resend them"


@dataclass(frozen=True)
class ServerLimits:
    """What one caller may hold. The engine queue defaults to ``max_streams * stream_window``
    so that streams alone never overflow it (reference builds share it)."""

    max_streams: int = 64  # concurrent Score / PutReference calls
    stream_window: int = 64  # requests of one stream read and not yet answered
    max_queue: int | None = None  # the engine's waiting queue
    queue_timeout: float = 10.0  # seconds a stream waits for room in a full queue
    max_message_bytes: int = 4 * 2**20
    reference_chunk: int = 512  # validation samples buffered per build step of PutReference
    reference_chunk_bytes: int = 16 * 2**20

    @property
    def queue_size(self) -> int:
        return self.max_queue or self.max_streams * self.stream_window


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ValuationServer:
    """``start()`` binds and serves health (NOT_SERVING); ``load()`` makes the model and the
    references resident and turns SERVING; ``drain()`` finishes what was accepted and stops.
    ``engine_options`` go to AsyncEngine (loss_on, max_length, max_batch_tokens, policy, ...)."""

    def __init__(self, config: ServerConfig, engine_options: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.engine_options = dict(engine_options or {})
        self.engine: AsyncEngine | None = None
        self.port: int | None = None
        self.ready = False  # the model and the start-up references are resident
        self.draining = False
        self.streams: set[_ScoreStream] = set()
        self.open_calls = 0
        self.counters = {"streams_refused": 0, "streams_overloaded": 0, "unauthenticated": 0}
        self.progress = _Progress()
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        limits = self.config.limits
        interceptors = [] if self.config.token is None else [_BearerToken(self.config.token, self.counters)]
        self._server = grpc.aio.server(
            interceptors=interceptors, options=_server_options(limits),
            # A hard cap on all calls; streams are limited (with a clear message) by the servicer.
            maximum_concurrent_rpcs=2 * limits.max_streams + 16)
        pb_grpc.add_ValuationServicer_to_server(_Valuation(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self._server)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._bind()
        await self._server.start()
        return self.port

    def _bind(self) -> int:
        config = self.config
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if config.tls_cert is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            port = self._server.add_secure_port(config.address, credentials)
        else:
            if config.token is not None and not _is_loopback(config.host):
                log.warning("a bearer token without TLS travels in clear text on %s", config.host)
            port = self._server.add_insecure_port(config.address)
        if not port:
            raise OSError(f"cannot listen on {config.address}")
        return port

    async def load(self, model: ValuationModel, references: Mapping[str, Any] | None = None, *,
                   normalize: str = "none") -> None:
        """Start the engine on ``model``, install ``references`` (name -> a Reference, a
        ``.safetensors`` file, a samples file, or a list of samples), then report SERVING."""
        engine = AsyncEngine(model, max_waiting=self.config.limits.queue_size, **self.engine_options)
        await engine.__aenter__()
        self.engine = engine
        for name, source in (references or {}).items():
            info = await _install_reference(engine, name, source, normalize)
            log.info("reference %r: %d samples (%d skipped), normalize=%s", name, info.count,
                     info.skipped, info.normalize)
        self.ready = True
        for service in ("", SERVICE_NAME):  # ignored once draining
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace: float = 30.0) -> None:
        """Stop taking calls, answer everything accepted (up to ``grace`` seconds), stop."""
        if self.draining:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self._health.enter_graceful_shutdown()
        for stream in list(self.streams):
            stream.stop_reading()
        # While the accepted work finishes, new calls reach the servicer and get UNAVAILABLE
        # (retry elsewhere); once the gRPC server is stopped, its core would CANCEL them instead.
        while self.open_calls and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - loop.time()))
        if self.engine is not None:
            await self.engine.close()

    def engine_or_none(self) -> AsyncEngine | None:
        return self.engine if self.ready and not self.draining else None


# ---------------------------------------------------------------------- the service


class _Valuation(pb_grpc.ValuationServicer):
    def __init__(self, server: ValuationServer) -> None:
        self.server = server

    async def Score(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResult]:
        engine = await self._engine(context)
        async with _CallSlot(self.server, context):
            stream = _ScoreStream(engine, self.server, context)
            self.server.streams.add(stream)
            try:
                async for result in stream.run(request_iterator):
                    yield result
            finally:
                self.server.streams.discard(stream)
            if stream.status is not None:
                if stream.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.server.counters["streams_overloaded"] += 1
                await context.abort(*stream.status)

    async def PutReference(self, request_iterator: AsyncIterator[pb.ReferenceSample],
                           context: grpc.aio.ServicerContext) -> pb.ReferenceInfo:
        engine = await self._engine(context)
        async with _CallSlot(self.server, context):
            builder = _ReferenceUpload(engine, self.server.config.limits)
            try:
                async for message in request_iterator:
                    await builder.add(message)
                info = await builder.finish()
            except _CallError as error:
                await context.abort(error.code, str(error))
            return _reference_info(info)

    async def ListReferences(self, request: pb.ListReferencesRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListReferencesResponse:
        engine = await self._engine(context)
        infos = [i for i in engine.references() if REFERENCE_NAME.fullmatch(i.name)]  # not uploads
        return pb.ListReferencesResponse(references=[_reference_info(i) for i in infos])

    async def DropReference(self, request: pb.DropReferenceRequest,
                            context: grpc.aio.ServicerContext) -> pb.DropReferenceResponse:
        engine = await self._engine(context)
        if not REFERENCE_NAME.fullmatch(request.name):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad reference name {request.name!r}")
        return pb.DropReferenceResponse(dropped=engine.drop_reference(request.name))

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        engine = await self._engine(context)
        stats = engine.stats()
        latency = {phase: pb.Quantiles(p50=q.get(0.5, 0.0), p90=q.get(0.9, 0.0), p99=q.get(0.99, 0.0))
                   for phase, q in stats.latency.items()}
        return pb.Stats(waiting=stats.waiting, running=stats.running, references=stats.references,
                        steps=stats.steps, tokens_total=stats.tokens_total,
                        tokens_per_second=stats.tokens_per_second, requests=stats.requests,
                        latency=latency, active_streams=len(self.server.streams),
                        prometheus_text=engine.prometheus_text() + self._server_metrics())

    def _server_metrics(self) -> str:
        server = self.server
        lines = ["# HELP forvalue_active_streams Open Score calls.",
                 "# TYPE forvalue_active_streams gauge", f"forvalue_active_streams {len(server.streams)}",
                 "# HELP forvalue_refused_calls_total Calls refused by the server, by reason.",
                 "# TYPE forvalue_refused_calls_total counter"]
        lines += [f'forvalue_refused_calls_total{{reason="{reason}"}} {count}'
                  for reason, count in sorted(server.counters.items())]
        return "\n".join(lines) + "\n"

    async def _engine(self, context: grpc.aio.ServicerContext) -> AsyncEngine:
        engine = self.server.engine_or_none()
        if engine is None:
            state = "draining" if self.server.draining else "still loading"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the server is {state}; retry later")
        return engine


class _CallSlot:
    """Counts a streaming call against ``max_streams``; over the limit it is refused."""

    def __init__(self, server: ValuationServer, context: grpc.aio.ServicerContext) -> None:
        self.server, self.context = server, context

    async def __aenter__(self) -> None:
        limit = self.server.config.limits.max_streams
        if self.server.open_calls >= limit:
            self.server.counters["streams_refused"] += 1
            await self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"too many open streams (limit {limit}); retry later")
        self.server.open_calls += 1

    async def __aexit__(self, *exc_info: Any) -> None:
        self.server.open_calls -= 1


class _Progress:
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


class _ScoreStream:
    """One Score call. A reader task admits requests into the engine while fewer than
    ``stream_window`` are unanswered; ``run`` yields results in completion order. Leaving
    ``run`` (finished, cancelled, expired, disconnected) cancels what is still queued."""

    def __init__(self, engine: AsyncEngine, server: ValuationServer,
                 context: grpc.aio.ServicerContext) -> None:
        self.engine = engine
        self.limits = server.config.limits
        self.progress = server.progress
        self.context = context
        self.status: tuple[grpc.StatusCode, str] | None = None  # how the call must end
        self._window = asyncio.Semaphore(self.limits.stream_window)
        self._results: asyncio.Queue[pb.ScoreResult | None] = asyncio.Queue()  # None: reader done
        self._pending: dict[int, ScoreHandle] = {}  # admitted, not yet answered by the engine
        self._unanswered = 0  # accepted, result not yet written
        self._reader: asyncio.Task | None = None

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
        finally:
            self._reader.cancel()
            for request_id in list(self._pending):
                self.engine.cancel(request_id)

    def stop_reading(self) -> None:
        """Drain: read nothing more; what was accepted is still answered."""
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self, requests: AsyncIterator[pb.ScoreRequest]) -> None:
        try:
            while True:
                await self._window.acquire()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                await self._accept(request)
        except asyncio.CancelledError:
            self.status = (grpc.StatusCode.UNAVAILABLE, f"the server is shutting down; {UNACCEPTED}")
            raise
        except _Overloaded:
            self.status = (grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is overloaded (its queue "
                           f"stayed full for {self.limits.queue_timeout:g} s); {UNACCEPTED} later")
        except EngineClosed:
            self.status = (grpc.StatusCode.UNAVAILABLE, f"the server is shutting down; {UNACCEPTED}")
        except Exception as error:  # a bug: end the call, keep serving others
            log.exception("reading a Score stream failed")
            self.status = (grpc.StatusCode.INTERNAL, f"internal error: {error!r}; {UNACCEPTED}")
        finally:
            self._results.put_nowait(None)

    async def _accept(self, request: pb.ScoreRequest) -> None:
        try:
            sample = _sample_of(request)
        except _BadSample as error:
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
        self._results.put_nowait(_score_result(future.result(), client_id))


class _CallError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _ReferenceUpload:
    """PutReference: samples are built in bounded chunks under a hidden name, summed, and
    installed under the real name only when the upload is complete (atomic for scorers)."""

    def __init__(self, engine: AsyncEngine, limits: ServerLimits) -> None:
        self.engine = engine
        self.limits = limits
        self.name = ""
        self.normalize = "none"
        self.merge = False
        self.total: Reference | None = None
        self.skipped = 0
        self._chunk: list[Any] = []
        self._chunk_bytes = 0
        self._hidden = f".upload-{uuid.uuid4().hex}"  # REFERENCE_NAME never matches it

    async def add(self, message: pb.ReferenceSample) -> None:
        if not self.name:
            self._header(message)
        elif message.name and message.name != self.name:
            raise _CallError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"one upload builds one reference: got {message.name!r} after {self.name!r}")
        try:
            self._chunk.append(_sample_of(message))
        except _BadSample:
            self.skipped += 1
        self._chunk_bytes += message.ByteSize()
        if len(self._chunk) >= self.limits.reference_chunk or \
                self._chunk_bytes >= self.limits.reference_chunk_bytes:
            await self._build_chunk()

    def _header(self, message: pb.ReferenceSample) -> None:
        if not REFERENCE_NAME.fullmatch(message.name):
            raise _CallError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"bad reference name {message.name!r}: use letters, digits and _.:- "
                             f"(at most 128, starting with a letter or digit)")
        normalize = message.normalize or "none"
        if normalize not in NORMALIZATIONS:
            raise _CallError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.name, self.normalize, self.merge = message.name, normalize, message.merge

    async def _build_chunk(self) -> None:
        chunk, self._chunk, self._chunk_bytes = self._chunk, [], 0
        try:
            info = await self.engine.build_reference(self._hidden, chunk, normalize=self.normalize)
            part = self.engine.get_reference(self._hidden)
        except EngineClosed:
            raise _CallError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down") from None
        except ValueError:  # no valid sample in this chunk (the options were checked before)
            self.skipped += len(chunk)
            return
        finally:
            self.engine.drop_reference(self._hidden)
        self.skipped += info.skipped
        self.total = part if self.total is None else self.total.merge(part)

    async def finish(self) -> Any:
        if not self.name:
            raise _CallError(grpc.StatusCode.INVALID_ARGUMENT, "an upload needs at least one sample")
        if self._chunk:
            await self._build_chunk()
        if self.total is None:
            raise _CallError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"reference {self.name!r}: no valid validation sample ({self.skipped} skipped)")
        reference = Reference(self.total.gradient_sum, self.total.count, self.total.normalize,
                              self.total.identity, {**self.total.info, "skipped": str(self.skipped)})
        try:
            return self.engine.put_reference(self.name, reference, merge=self.merge)
        except ValueError as error:  # ReferenceMismatch: merging into another normalisation
            raise _CallError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None


# ---------------------------------------------------------------------- conversions


class _BadSample(ValueError):
    pass


def _sample_of(message: pb.ScoreRequest | pb.ReferenceSample) -> Any:
    """The sample a message carries, as the engine takes it; the engine checks the rest."""
    kind = message.WhichOneof("sample")
    if kind == "fields":
        return _fields_sample(message.fields)
    if kind != "json":
        raise _BadSample(f"request {getattr(message, 'id', '')!r}: carries no sample")
    try:
        return json.loads(message.json)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise _BadSample(f"request {getattr(message, 'id', '')!r}: the sample is not valid JSON "
                         f"({error})") from None


def _fields_sample(fields: pb.Sample) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    for name in ("id", "prompt", "response", "text"):
        if fields.HasField(name):
            sample[name] = getattr(fields, name)
    if fields.messages:
        sample["messages"] = [{"role": m.role, "content": m.content} for m in fields.messages]
    for name in ("input_ids", "loss_mask", "labels"):
        if getattr(fields, name):
            sample[name] = list(getattr(fields, name))
    return sample


def _score_result(result: EngineResult, client_id: str) -> pb.ScoreResult:
    message = pb.ScoreResult(id=client_id or result.id, reference=result.reference, value=result.value,
                             error=result.error, num_tokens=result.num_tokens,
                             num_labels=result.num_labels, truncated=result.truncated,
                             queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds)
    tokens = result.token_values
    if tokens is not None:
        message.token_values.positions.extend(tokens.positions.tolist())
        message.token_values.token_ids.extend(tokens.token_ids.tolist())
        message.token_values.values.extend(tokens.values.tolist())
    return message


def _reference_info(info: Any) -> pb.ReferenceInfo:
    return pb.ReferenceInfo(name=info.name, count=info.count, normalize=info.normalize,
                            loss_on=info.loss_on, skipped=info.skipped, version=info.version)


async def _install_reference(engine: AsyncEngine, name: str, source: Any, normalize: str) -> Any:
    if not REFERENCE_NAME.fullmatch(name):
        raise ValueError(f"bad reference name {name!r}: use letters, digits and _.:-")
    if isinstance(source, Reference):
        return engine.put_reference(name, source)
    if isinstance(source, (str, os.PathLike)):
        if str(source).endswith(".safetensors"):
            return engine.put_reference(name, await asyncio.to_thread(Reference.load, source))
        source = await asyncio.to_thread(read_samples, source)
    return await engine.build_reference(name, source, normalize=normalize)


# ---------------------------------------------------------------------- security


class _BearerToken(grpc.aio.ServerInterceptor):
    """Every call must carry ``authorization: Bearer TOKEN`` (compared in constant time)."""

    def __init__(self, token: str, counters: dict[str, int]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._counters = counters

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        offered = str(metadata.get("authorization", "")).encode()
        if handler is None or hmac.compare_digest(offered, self._expected):
            return handler
        self._counters["unauthenticated"] += 1
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts (read nothing, run nothing)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        refuse, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


def _server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            # Linux allows a second server on the same port by default: refuse to share it.
            ("grpc.so_reuseport", 0),
            # Ping idle connections so that a vanished client's queued work is freed.
            ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


# ---------------------------------------------------------------------- CLI


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue serve``."""
    limits = ServerLimits()
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded model name or local Hugging Face model folder (default: smollm2-135m)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"default: {DEFAULT_PORT}; 0 picks a free one")
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=FILE",
                        help="a reference to build at start-up from a JSONL of validation samples or "
                             "a saved .safetensors Reference (repeatable)")
    parser.add_argument("--normalize", default="none", choices=("none", "mean", "cosine"),
                        help="normalisation of references built from samples (default: none)")
    parser.add_argument("--loss-on", default="response", choices=("response", "all"))
    parser.add_argument("--max-length", type=int, help="truncate longer samples to this many tokens")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="float32, bfloat16, ... (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per engine step")
    parser.add_argument("--max-seqs", type=int, default=128, help="samples per engine step")
    parser.add_argument("--policy", default="fcfs", choices=("fcfs", "priority"))
    parser.add_argument("--max-queue-delay-ms", type=float, default=DEFAULT_QUEUE_DELAY_MS,
                        help="after a step that answered requests, wait this long for the callers' "
                             "next samples before starting the next step (fuller steps, a little "
                             f"latency; default: {DEFAULT_QUEUE_DELAY_MS:g})")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the bearer token every call must carry (or set "
                             "FORVALUE_TOKEN); without either, calls are not authenticated")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--max-streams", type=int, default=limits.max_streams,
                        help=f"concurrent streaming calls (default: {limits.max_streams})")
    parser.add_argument("--stream-window", type=int, default=limits.stream_window,
                        help=f"requests one stream may have unanswered (default: {limits.stream_window})")
    parser.add_argument("--max-queue", type=int,
                        help="engine waiting queue (default: max-streams x stream-window)")
    parser.add_argument("--queue-timeout", type=float, default=limits.queue_timeout,
                        help="seconds a stream waits for room in a full queue before the call ends "
                             f"with RESOURCE_EXHAUSTED (default: {limits.queue_timeout:g})")
    parser.add_argument("--max-message-mb", type=float, default=limits.max_message_bytes / 2**20,
                        help="largest message accepted or sent (default: 4)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for accepted requests before cutting calls (default: 30)")


def run_serve(args: argparse.Namespace) -> int:
    """``forvalue serve``: serve until SIGTERM or SIGINT, then drain; returns the exit status."""
    _log_to_stderr()
    try:
        config = _config_from_args(args)
        references = dict(_parse_reference_spec(spec) for spec in args.reference)
    except (ValueError, OSError) as error:
        return user_error(error)
    return asyncio.run(_serve(args, config, references))


def _log_to_stderr() -> None:
    logger = logging.getLogger("forvalue")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("forvalue: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _config_from_args(args: argparse.Namespace) -> ServerConfig:
    token = os.environ.get("FORVALUE_TOKEN")
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip()
    if token is not None and not token:
        raise ValueError("the bearer token is empty")
    limits = ServerLimits(max_streams=args.max_streams, stream_window=args.stream_window,
                          max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                          max_message_bytes=int(args.max_message_mb * 2**20))
    if min(limits.max_streams, limits.stream_window, limits.queue_size) < 1:
        raise ValueError("--max-streams, --stream-window and --max-queue must be positive")
    if args.max_queue_delay_ms < 0:
        raise ValueError("--max-queue-delay-ms must be >= 0")
    return ServerConfig(host=args.host, port=args.port, token=token, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, limits=limits)


def _parse_reference_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not REFERENCE_NAME.fullmatch(name) or not path:
        raise ValueError(f"--reference must look like NAME=FILE (NAME: letters, digits, _.:-), got {spec!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"--reference {name}: no such file: {path}")
    return name, Path(path)


async def _serve(args: argparse.Namespace, config: ServerConfig, references: dict[str, Path]) -> int:
    engine_options = {"loss_on": args.loss_on, "max_length": args.max_length,
                      "max_batch_tokens": args.max_batch_tokens, "max_seqs": args.max_seqs,
                      "policy": args.policy, "max_queue_delay": args.max_queue_delay_ms / 1000}
    server = ValuationServer(config, engine_options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        port = await server.start()
    except (ValueError, OSError, RuntimeError) as error:  # grpc raises RuntimeError on a bad address
        return user_error(error)
    log.info("listening on %s:%d (%s); loading %s", config.host, port,
             "TLS" if config.tls_cert else "plaintext", args.model)
    status = await _load_until_stopped(server, args, references, stop)
    if status == 0:
        log.info("serving on %s:%d", config.host, port)
        await stop.wait()
        log.info("draining (up to %g s)", args.drain_timeout)
    await server.drain(args.drain_timeout)
    return status


async def _load_until_stopped(server: ValuationServer, args: argparse.Namespace,
                              references: dict[str, Path], stop: asyncio.Event) -> int:
    async def load() -> None:
        model = await asyncio.to_thread(load_model, args.model, device=args.device, dtype=args.dtype)
        await server.load(model, references, normalize=args.normalize)

    loading = asyncio.ensure_future(load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not loading.done():  # stopped while loading
        loading.cancel()
        return 0
    try:
        loading.result()
    except (ValueError, OSError) as error:  # SampleError, ModelError, ReferenceMismatch, files
        return user_error(error)
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forvalue serve")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
