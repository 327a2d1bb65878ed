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

Here: the server's lifecycle and the servicer. The streaming calls are in ``calls.py``, the
message conversions in ``wire.py``, the bearer token in ``auth.py``, and ``forvalue serve``
(flags, signals, loading) in ``serve.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from forvalue.engine import Covariance, Index, Reference, ValuationModel
from forvalue.engine.config import ValuationConfig
from forvalue.engine.inputs.readers import read_samples
from forvalue.engine.serving.async_engine import AsyncEngine

from .. import forvalue_pb2 as pb
from .. import forvalue_pb2_grpc as pb_grpc
from ..wire import REFERENCE_NAME, reference_info_message, stats_message
from .auth import BearerToken
from .calls import CallError, Progress, ReferenceUpload, ScoreStream, answer_query

log = logging.getLogger("forvalue.server")

DEFAULT_PORT = 50051
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Valuation"].full_name




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
    ``valuation``: the engine's options, a ValuationConfig or its keywords (``forvalue serve``'s
    defaults for the rest); the engine's waiting queue is the server's (``ServerLimits``)."""

    def __init__(self, config: ServerConfig,
                 valuation: ValuationConfig | Mapping[str, Any] | None = None) -> None:
        self.config = config
        if not isinstance(valuation, ValuationConfig):
            valuation = ValuationConfig.from_options("serve", valuation or {})
        self.valuation = valuation.replace(max_waiting=config.limits.queue_size)
        self.engine: AsyncEngine | None = None
        self.index: Index | None = None  # answers Query
        self.port: int | None = None
        self.ready = False  # the model and the start-up references are resident
        self.draining = False
        self.streams: set[ScoreStream] = set()
        self.open_calls = 0
        self.counters = {"streams_refused": 0, "streams_overloaded": 0, "unauthenticated": 0}
        self.progress = Progress()
        self._health = HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        limits = self.config.limits
        interceptors = [] if self.config.token is None else [BearerToken(self.config.token, self.counters)]
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
                   covariances: Mapping[str, Covariance] | None = None,
                   index: str | os.PathLike | None = None) -> None:
        """Start the engine on ``model``, hold ``covariances`` (name -> Covariance; the first is
        the default of reference builds), open ``index`` (a folder of ``forvalue index build``,
        for Query), install ``references`` (name -> a Reference, a ``.safetensors`` file, a
        samples file, or a list of samples), then report SERVING."""
        engine = AsyncEngine(model, self.valuation)
        await engine.__aenter__()
        self.engine = engine
        if index is not None:
            self.index = await engine.on_forward_thread(Index.open, index, model, progress=False)
            await engine.on_forward_thread(self.index.prepare_queries)  # not on the first Query
        for number, (name, covariance) in enumerate((covariances or {}).items()):
            engine.put_covariance(name, covariance, default=number == 0)
        for name, source in (references or {}).items():
            info = await _install_reference(engine, name, source)
            log.info("reference %r: %d samples (%d skipped), normalize=%s, precondition=%s", name,
                     info.count, info.skipped, info.normalize, info.precondition)
        self.ready = True
        for service in ("", SERVICE_NAME):  # ignored once draining
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace: float = 30.0) -> None:
        """Stop taking calls, answer everything accepted (up to ``grace`` seconds), stop, and
        close the model (a vLLM engine's processes stop now, not in exit-time finalizers)."""
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
            self.engine.model.close()

    def engine_or_none(self) -> AsyncEngine | None:
        return self.engine if self.ready and not self.draining else None

    def prometheus_text(self) -> str:
        """Every figure of the server in Prometheus' text format: the engine's (once it is
        loaded) and the server's own. GetStats and ``--metrics-port`` both serve this."""
        lines = ["# HELP forvalue_active_streams Open Score calls.",
                 "# TYPE forvalue_active_streams gauge", f"forvalue_active_streams {len(self.streams)}",
                 "# HELP forvalue_refused_calls_total Calls refused by the server, by reason.",
                 "# TYPE forvalue_refused_calls_total counter"]
        lines += [f'forvalue_refused_calls_total{{reason="{reason}"}} {count}'
                  for reason, count in sorted(self.counters.items())]
        engine = "" if self.engine is None else self.engine.prometheus_text()
        return engine + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the service


class _Valuation(pb_grpc.ValuationServicer):
    def __init__(self, server: ValuationServer) -> None:
        self.server = server

    async def Score(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResult]:
        engine = await self._engine(context)
        async with _CallSlot(self.server, context):
            stream = ScoreStream(engine, self.server.config.limits, self.server.progress, context)
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
            builder = ReferenceUpload(engine, self.server.config.limits)
            try:
                async for message in request_iterator:
                    await builder.add(message)
                info = await builder.finish()
            except CallError as error:
                await context.abort(error.code, str(error))
            return reference_info_message(info)

    async def ListReferences(self, request: pb.ListReferencesRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListReferencesResponse:
        engine = await self._engine(context)
        infos = [i for i in engine.references() if REFERENCE_NAME.fullmatch(i.name)]  # not uploads
        return pb.ListReferencesResponse(references=[reference_info_message(i) for i in infos])

    async def DropReference(self, request: pb.DropReferenceRequest,
                            context: grpc.aio.ServicerContext) -> pb.DropReferenceResponse:
        engine = await self._engine(context)
        if not REFERENCE_NAME.fullmatch(request.name):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad reference name {request.name!r}")
        return pb.DropReferenceResponse(dropped=engine.drop_reference(request.name))

    async def Query(self, request_iterator: AsyncIterator[pb.QueryRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.QueryResult]:
        engine = await self._engine(context)
        index = self.server.index
        if index is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this server has no index: start it with --index IDX")
        async with _CallSlot(self.server, context):
            async for request in request_iterator:
                yield await answer_query(engine, index, request)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        engine = await self._engine(context)
        index = "" if self.server.index is None else self.server.index.fingerprint
        return stats_message(engine.stats(), len(self.server.streams), self.server.prometheus_text(), index)

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


async def _install_reference(engine: AsyncEngine, name: str, source: Any) -> Any:
    if not REFERENCE_NAME.fullmatch(name):
        raise ValueError(f"bad reference name {name!r}: use letters, digits and _.:-")
    if isinstance(source, Reference):
        return engine.put_reference(name, source)
    if isinstance(source, (str, os.PathLike)):
        if str(source).endswith(".safetensors"):
            return engine.put_reference(name, await asyncio.to_thread(Reference.load, source))
        source = await asyncio.to_thread(read_samples, source)
    return await engine.build_reference(name, source)


def _server_options(limits: ServerLimits) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            # Linux allows a second server on the same port by default: refuse to share it.
            ("grpc.so_reuseport", 0),
            # Ping idle connections so that a vanished client's queued work is freed.
            ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
