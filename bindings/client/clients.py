"""Python clients of the valuation server (the SDK; ``forvalue stream`` is in bindings/cli/stream.py).

    from forvalue.bindings import Client
    with Client("127.0.0.1:50051", token=None) as client:
        for r in client.score_stream(samples, reference="valid"):  # as results arrive
            r.id, r.value, r.error, r.num_tokens                   # error: "" when scored
        for a in client.query_stream(samples, top=10):             # server with --index
            a.id, a.most, a.least, a.error                         # (id, value) pairs

``AsyncClient`` has the same methods as coroutines (``score_stream`` is an async generator
and also takes an async iterable of samples). Samples are dicts as in a JSONL file. A result's
``id`` is the sample's "id", or its position in ``samples`` when it has none; results come in
completion order. A call that fails as a whole raises ServerError (``code``: the gRPC status).
Leaving ``score_stream`` early cancels the call, which frees the server's queued work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .. import forvalue_pb2 as pb
from .. import forvalue_pb2_grpc as pb_grpc
from ..wire import (
    QueryAnswer,
    ReferenceInfo,
    ReferenceOptions,
    Result,
    TokenValues,
    query_answer_of,
    query_request,
    reference_info_of,
    reference_sample,
    result_of,
    sample_id,
    score_request,
    stats_of,
)
from .errors import RETRYABLE, ServerError

__all__ = ["AsyncClient", "Client", "QueryAnswer", "ReferenceInfo", "Result", "ServerError", "TokenValues"]

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20


class _Tracker:
    """Turns samples into requests (wire id = position) and results back (the sample's id)."""

    def __init__(self, reference: str, priority: int, token_values: bool) -> None:
        self.reference, self.priority, self.token_values = reference, priority, token_values
        self.ids: dict[str, tuple[int, str]] = {}  # wire id -> (position, the sample's id)
        self.sent = 0
        self.failure: BaseException | None = None  # raised by the caller's samples iterable

    def request(self, sample: Mapping[str, Any]) -> pb.ScoreRequest:
        index = self.sent
        wire_id = str(index)
        self.ids[wire_id] = (index, sample_id(sample, index))
        self.sent += 1
        return score_request(wire_id, sample, self.reference, self.priority, self.token_values)

    def requests(self, samples: Iterable[Mapping[str, Any]]) -> Iterator[pb.ScoreRequest]:
        # An exception inside a request iterator only cancels the call: keep it to re-raise.
        try:
            for sample in samples:
                yield self.request(sample)
        except Exception as error:
            self.failure = error

    async def async_requests(self, samples: Iterable[Any] | AsyncIterable[Any],
                             ) -> AsyncIterator[pb.ScoreRequest]:
        try:
            if isinstance(samples, AsyncIterable):
                async for sample in samples:
                    yield self.request(sample)
            else:
                for sample in samples:
                    yield self.request(sample)
        except Exception as error:
            self.failure = error

    def result(self, message: pb.ScoreResult) -> Result:
        index, name = self.ids.pop(message.id)
        return result_of(message, name, index)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.ids:  # an OK end with requests unanswered breaks the contract: never silent
            raise ServerError(grpc.StatusCode.INTERNAL, f"{len(self.ids)} requests got no result")


class _Queries:
    """Query requests (wire id = position) and their answers back (under the sample's id)."""

    def __init__(self, top: int, where: Sequence[str]) -> None:
        self.top, self.where = top, list(where)
        self.names: list[str] = []

    def request(self, sample: Mapping[str, Any]) -> pb.QueryRequest:
        self.names.append(sample_id(sample, len(self.names)))
        return query_request(str(len(self.names) - 1), sample, self.top, self.where)

    def answer(self, message: pb.QueryResult) -> QueryAnswer:
        index = int(message.id)
        return query_answer_of(message, self.names[index], index)


def _reference_samples(name: str, samples: Iterable[Mapping[str, Any]],
                       options: ReferenceOptions) -> Iterator[pb.ReferenceSample]:
    for sample in samples:
        yield reference_sample(name, sample, options)


def _open_channel(grpc_module: Any, address: str, tls: bool, root_certificates: bytes | str | Path | None,
                  max_message_bytes: int) -> Any:
    """A channel of ``grpc`` or ``grpc.aio`` (the two share these functions)."""
    credentials = _credentials(tls, root_certificates)
    options = _channel_args(max_message_bytes)
    if credentials is None:
        return grpc_module.insecure_channel(address, options)
    return grpc_module.secure_channel(address, credentials, options)


def _channel_args(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _credentials(tls: bool, root_certificates: bytes | str | Path | None) -> grpc.ChannelCredentials | None:
    if root_certificates is not None and not isinstance(root_certificates, bytes):
        root_certificates = Path(root_certificates).read_bytes()
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class _Base:
    def __init__(self, address: str, token: str | None, timeout: float | None) -> None:
        self.address = address
        self.timeout = timeout  # deadline of the quick unary calls, in seconds (None: none)
        # Sent on every call, TLS or not (gRPC's call credentials refuse plaintext channels).
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)


class Client(_Base):
    """Blocking client. ``tls=True`` (or ``root_certificates``, a PEM file or bytes, for a
    private CA) encrypts the channel; ``token`` is the server's bearer token.

    Several addresses (``Client(["a:50051", "b:50051"])``) are replicas: ``score_stream``
    keeps a stream on each ready one (``window`` requests unanswered at most) and re-sends a
    failed replica's requests to the others (``replicas.py``); ``put_reference`` and
    ``drop_reference`` go to every replica, the other calls to the first."""

    def __init__(self, address: str | Sequence[str], token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, window: int = 64) -> None:
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise ValueError("a Client needs at least one address")
        super().__init__(addresses[0], token, timeout)
        self._channel = _open_channel(grpc, addresses[0], tls, root_certificates, max_message_bytes)
        self._stub = pb_grpc.ValuationStub(self._channel)
        self.window = window
        self.replicas = [self, *(Client(other, token, tls=tls, root_certificates=root_certificates,
                                        timeout=timeout, max_message_bytes=max_message_bytes)
                                 for other in addresses[1:])]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        for replica in self.replicas:
            replica._channel.close()

    def score_stream(self, samples: Iterable[Mapping[str, Any]], reference: str, *, priority: int = 0,
                     token_values: bool = False, timeout: float | None = None) -> Iterator[Result]:
        """Results as they arrive. ``timeout`` is a deadline for the whole stream (none by
        default); samples are read lazily, as the server makes room for them."""
        tracker = _Tracker(reference, priority, token_values)
        if len(self.replicas) > 1:
            from .replicas import score_stream

            yield from score_stream(self.replicas, tracker, samples, window=self.window, timeout=timeout)
            return
        call = self._stub.Score(tracker.requests(samples), metadata=self.metadata, timeout=timeout)
        try:
            for message in call:
                yield tracker.result(message)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None
        finally:
            call.cancel()  # a no-op when finished; frees the server's work when left early
        tracker.check()

    def query_stream(self, samples: Iterable[Mapping[str, Any]], *, top: int = 10,
                     where: Sequence[str] = (), timeout: float | None = None) -> Iterator[QueryAnswer]:
        """For each sample, in order, the server index's stored samples of highest and lowest
        value for it (``forvalue serve --index IDX``; the first replica's); ``where``:
        ``KEY=VALUE`` items, only the stored samples whose metadata matches."""
        queries = _Queries(top, where)
        call = self._stub.Query(map(queries.request, samples), metadata=self.metadata, timeout=timeout)
        try:
            for message in call:
                yield queries.answer(message)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None
        finally:
            call.cancel()

    def put_reference(self, name: str, samples: Iterable[Mapping[str, Any]], *, normalize: str = "none",
                      merge: bool = False, timeout: float | None = None, precondition: str | None = None,
                      damping: float | None = None, covariance: str | None = None) -> ReferenceInfo:
        """Build a reference on the server from validation samples (streamed, any number).
        Building takes a forward pass per sample: no deadline unless ``timeout`` is given.
        ``precondition`` ("none" | "input"), ``damping`` and ``covariance`` ("valid" or the
        name of a covariance the server holds) default to the server's."""
        options = ReferenceOptions(normalize, merge, precondition, damping, covariance)
        samples = list(samples) if len(self.replicas) > 1 else samples  # sent to each replica
        infos = [reference_info_of(replica._call(replica._stub.PutReference,
                                                 _reference_samples(name, samples, options), timeout))
                 for replica in self.replicas]
        return infos[0]

    def list_references(self) -> list[ReferenceInfo]:
        reply = self._call(self._stub.ListReferences, pb.ListReferencesRequest(), self.timeout)
        return [reference_info_of(info) for info in reply.references]

    def drop_reference(self, name: str) -> bool:
        request = pb.DropReferenceRequest(name=name)
        return any([r._call(r._stub.DropReference, request, self.timeout).dropped for r in self.replicas])

    def stats(self) -> dict[str, Any]:
        """Queue, throughput, outcomes, latency quantiles; ``prometheus_text`` holds them all."""
        return stats_of(self._call(self._stub.GetStats, pb.GetStatsRequest(), self.timeout))

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... as the standard health service reports it."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 600.0) -> None:
        """Block until the server (every replica) reports SERVING (it loads the model first)."""
        deadline = time.monotonic() + timeout
        for replica in self.replicas[1:]:
            replica.wait_until_serving(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except ServerError as error:
                if error.code not in RETRYABLE or time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} did not report SERVING within {timeout:g} s")
            time.sleep(0.2)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None


class AsyncClient(_Base):
    """The asyncio twin of Client (grpc.aio); use it with ``async with``."""

    def __init__(self, address: str, token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(address, token, timeout)
        self._channel = _open_channel(grpc.aio, address, tls, root_certificates, max_message_bytes)
        self._stub = pb_grpc.ValuationStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def score_stream(self, samples: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
                           reference: str, *, priority: int = 0, token_values: bool = False,
                           timeout: float | None = None) -> AsyncIterator[Result]:
        tracker = _Tracker(reference, priority, token_values)
        call = self._stub.Score(tracker.async_requests(samples), metadata=self.metadata, timeout=timeout)
        try:
            async for message in call:
                yield tracker.result(message)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None
        finally:
            call.cancel()
        tracker.check()

    async def query_stream(self, samples: Iterable[Mapping[str, Any]], *, top: int = 10,
                           where: Sequence[str] = (),
                           timeout: float | None = None) -> AsyncIterator[QueryAnswer]:
        queries = _Queries(top, where)
        call = self._stub.Query(map(queries.request, samples), metadata=self.metadata, timeout=timeout)
        try:
            async for message in call:
                yield queries.answer(message)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None
        finally:
            call.cancel()

    async def put_reference(self, name: str, samples: Iterable[Mapping[str, Any]], *,
                            normalize: str = "none", merge: bool = False, timeout: float | None = None,
                            precondition: str | None = None, damping: float | None = None,
                            covariance: str | None = None) -> ReferenceInfo:
        options = ReferenceOptions(normalize, merge, precondition, damping, covariance)
        reply = await self._call(self._stub.PutReference, _reference_samples(name, samples, options), timeout)
        return reference_info_of(reply)

    async def list_references(self) -> list[ReferenceInfo]:
        reply = await self._call(self._stub.ListReferences, pb.ListReferencesRequest(), self.timeout)
        return [reference_info_of(info) for info in reply.references]

    async def drop_reference(self, name: str) -> bool:
        request = pb.DropReferenceRequest(name=name)
        return (await self._call(self._stub.DropReference, request, self.timeout)).dropped

    async def stats(self) -> dict[str, Any]:
        return stats_of(await self._call(self._stub.GetStats, pb.GetStatsRequest(), self.timeout))

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None
