"""Python clients of the valuation server, and ``forvalue stream``.

    from forvalue.bindings import Client
    with Client("127.0.0.1:50051", token=None) as client:
        for r in client.score_stream(samples, reference="valid"):  # as results arrive
            r.id, r.value, r.error, r.num_tokens                   # error: "" when scored

``AsyncClient`` has the same methods as coroutines (``score_stream`` is an async generator
and also takes an async iterable of samples). Samples are dicts as in a JSONL file. A result's
``id`` is the sample's "id", or its position in ``samples`` when it has none; results come in
completion order. A call that fails as a whole raises ServerError (``code``: the gRPC status).
Leaving ``score_stream`` early cancels the call, which frees the server's queued work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import forvalue_pb2 as pb
from . import forvalue_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ServerError(RuntimeError):
    """A call the server (or the connection) failed as a whole."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ServerError:
        return cls(error.code(), error.details() or "")


@dataclass(frozen=True)
class TokenValues:
    """Per-token contributions of one sample; they sum to its value."""

    positions: np.ndarray
    token_ids: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class Result:
    """One sample's answer. ``error`` is "" when scored; then ``value`` is finite."""

    id: str
    value: float
    error: str
    num_tokens: int
    num_labels: int = 0
    truncated: bool = False
    reference: str = ""
    index: int = -1  # the sample's position in the samples given to score_stream
    token_values: TokenValues | None = None
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class ReferenceInfo:
    name: str
    count: int
    normalize: str
    loss_on: str
    skipped: int
    version: int


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
        self.ids[wire_id] = (index, str(sample["id"]) if "id" in sample else wire_id)
        self.sent += 1
        return pb.ScoreRequest(id=wire_id, reference=self.reference, json=json.dumps(sample),
                               priority=self.priority, token_values=self.token_values)

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
        index, sample_id = self.ids.pop(message.id)
        tokens = None
        if message.HasField("token_values"):
            t = message.token_values
            tokens = TokenValues(np.array(t.positions, dtype=np.int64), np.array(t.token_ids, dtype=np.int64),
                                 np.array(t.values, dtype=np.float64))
        value = math.nan if message.error else message.value
        return Result(sample_id, value, message.error, message.num_tokens, message.num_labels,
                      message.truncated, message.reference, index, tokens, message.queue_seconds,
                      message.compute_seconds)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.ids:  # an OK end with requests unanswered breaks the contract: never silent
            raise ServerError(grpc.StatusCode.INTERNAL, f"{len(self.ids)} requests got no result")


def _reference_samples(name: str, samples: Iterable[Mapping[str, Any]], normalize: str,
                       merge: bool) -> Iterator[pb.ReferenceSample]:
    for sample in samples:
        yield pb.ReferenceSample(name=name, normalize=normalize, merge=merge, json=json.dumps(sample))


def _reference_info(message: pb.ReferenceInfo) -> ReferenceInfo:
    return ReferenceInfo(message.name, message.count, message.normalize, message.loss_on,
                         message.skipped, message.version)


def _stats(message: pb.Stats) -> dict[str, Any]:
    stats = {name: getattr(message, name) for name in (
        "waiting", "running", "references", "steps", "tokens_total", "tokens_per_second",
        "active_streams", "prometheus_text")}
    stats["requests"] = dict(message.requests)
    stats["latency"] = {phase: {"p50": q.p50, "p90": q.p90, "p99": q.p99}
                        for phase, q in message.latency.items()}
    return stats


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
    private CA) encrypts the channel; ``token`` is the server's bearer token."""

    def __init__(self, address: str, token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__(address, token, timeout)
        self._channel = _open_channel(grpc, address, tls, root_certificates, max_message_bytes)
        self._stub = pb_grpc.ValuationStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def score_stream(self, samples: Iterable[Mapping[str, Any]], reference: str, *, priority: int = 0,
                     token_values: bool = False, timeout: float | None = None) -> Iterator[Result]:
        """Results as they arrive. ``timeout`` is a deadline for the whole stream (none by
        default); samples are read lazily, as the server makes room for them."""
        tracker = _Tracker(reference, priority, token_values)
        call = self._stub.Score(tracker.requests(samples), metadata=self.metadata, timeout=timeout)
        try:
            for message in call:
                yield tracker.result(message)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None
        finally:
            call.cancel()  # a no-op when finished; frees the server's work when left early
        tracker.check()

    def put_reference(self, name: str, samples: Iterable[Mapping[str, Any]], *, normalize: str = "none",
                      merge: bool = False, timeout: float | None = None) -> ReferenceInfo:
        """Build a reference on the server from validation samples (streamed, any number).
        Building takes a forward pass per sample: no deadline unless ``timeout`` is given."""
        return _reference_info(self._call(self._stub.PutReference,
                                          _reference_samples(name, samples, normalize, merge), timeout))

    def list_references(self) -> list[ReferenceInfo]:
        reply = self._call(self._stub.ListReferences, pb.ListReferencesRequest(), self.timeout)
        return [_reference_info(info) for info in reply.references]

    def drop_reference(self, name: str) -> bool:
        return self._call(self._stub.DropReference, pb.DropReferenceRequest(name=name), self.timeout).dropped

    def stats(self) -> dict[str, Any]:
        """Queue, throughput, outcomes, latency quantiles; ``prometheus_text`` holds them all."""
        return _stats(self._call(self._stub.GetStats, pb.GetStatsRequest(), self.timeout))

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... as the standard health service reports it."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 600.0) -> None:
        """Block until the server reports SERVING (it loads the model first)."""
        deadline = time.monotonic() + timeout
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

    async def put_reference(self, name: str, samples: Iterable[Mapping[str, Any]], *,
                            normalize: str = "none", merge: bool = False,
                            timeout: float | None = None) -> ReferenceInfo:
        reply = await self._call(self._stub.PutReference, _reference_samples(name, samples, normalize, merge),
                                 timeout)
        return _reference_info(reply)

    async def list_references(self) -> list[ReferenceInfo]:
        reply = await self._call(self._stub.ListReferences, pb.ListReferencesRequest(), self.timeout)
        return [_reference_info(info) for info in reply.references]

    async def drop_reference(self, name: str) -> bool:
        request = pb.DropReferenceRequest(name=name)
        return (await self._call(self._stub.DropReference, request, self.timeout)).dropped

    async def stats(self) -> dict[str, Any]:
        return _stats(await self._call(self._stub.GetStats, pb.GetStatsRequest(), self.timeout))

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error) from None


# ---------------------------------------------------------------------- forvalue stream


class _OutputLog:
    """``--out`` (scored samples) and its ``.errors.jsonl`` twin, append-only. Lines are
    written as results arrive and fsynced at least every ``sync_seconds``, so a kill loses
    at most the unsynced tail, which a rerun recomputes; a torn last line is dropped."""

    def __init__(self, out: Path, sync_seconds: float = 0.5) -> None:
        from .batch import ResultLog  # the same append-only files as `forvalue score`

        self.results = ResultLog(out)
        self.errors = ResultLog(out.with_name(out.stem + ".errors.jsonl"))
        self.sync_seconds = sync_seconds
        self._buffers: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
        self._synced = time.monotonic()

    def done(self) -> set[str]:
        return {str(record["id"]) for record in self.results.records + self.errors.records}

    def add(self, record: dict[str, Any], failed: bool) -> None:
        self._buffers[failed].append(record)
        if time.monotonic() - self._synced >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        for log, buffer in zip((self.results, self.errors), self._buffers, strict=True):
            if buffer:
                log.append(buffer)
                buffer.clear()
        self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        self.results.close()
        self.errors.close()


def stream_file(server: str, reference: str, input_path: str | os.PathLike, out: str | os.PathLike, *,
                token: str | None = None, tls: bool = False, root_certificates: str | Path | None = None,
                limit: int | None = None, priority: int = 0, retries: int = 3,
                progress: bool = True) -> dict[str, Any]:
    """Value every sample of ``input_path`` on ``server`` against ``reference``, appending
    results to ``out`` (errors to ``OUT.errors.jsonl``). Samples already in either file are
    skipped, so an interrupted run resumes where it stopped. ``limit``: value at most this many
    new samples in this run. A call refused as UNAVAILABLE or RESOURCE_EXHAUSTED is retried
    ``retries`` times with backoff, resuming the same way."""
    from tqdm.auto import tqdm

    from forvalue.engine.readers import read_samples

    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    samples = read_samples(input_path)
    ids = _unique_ids(samples)
    log = _OutputLog(Path(out))
    try:
        with Client(server, token, tls=tls, root_certificates=root_certificates) as client:
            _check_reference(client, reference)
            done = log.done()
            todo = [i for i, sample_id in enumerate(ids) if sample_id not in done][:limit]
            with tqdm(total=len(samples), initial=len(samples) - _remaining(ids, log), unit="sample",
                      desc=f"stream {Path(input_path).name}", disable=not progress) as bar:
                for attempt in range(retries + 1):
                    try:
                        _stream_once(client, reference, samples, ids, todo, log, bar, priority)
                        break
                    except ServerError as error:
                        if error.code not in RETRYABLE or attempt == retries:
                            raise
                        log.sync()
                        bar.write(f"forvalue: {error}; retrying in {2 ** attempt} s")
                        time.sleep(2 ** attempt)
                        done = log.done()
                        todo = [i for i in todo if ids[i] not in done]
    finally:
        log.close()
    return {"scored": len(log.results.records), "errors": len(log.errors.records),
            "remaining": _remaining(ids, log), "out": str(out), "errors_file": str(log.errors.path)}


def _stream_once(client: Client, reference: str, samples: list[Any], ids: list[str], todo: list[int],
                 log: _OutputLog, bar: Any, priority: int) -> None:
    # Every sample goes out with an id, so a result maps back to its input line.
    payload = ({**samples[i], "id": ids[i]} if isinstance(samples[i], dict) else samples[i] for i in todo)
    for result in client.score_stream(payload, reference, priority=priority):
        index = todo[result.index]
        if result.error:
            log.add({"id": ids[index], "index": index, "error": result.error}, failed=True)
        else:
            log.add({"id": ids[index], "index": index, "value": result.value,
                     "num_tokens": result.num_tokens, "num_labels": result.num_labels,
                     **({"truncated": True} if result.truncated else {})}, failed=False)
        bar.update(1)


def _unique_ids(samples: list[Any]) -> list[str]:
    ids = [str(s["id"]) if isinstance(s, dict) and "id" in s else str(i) for i, s in enumerate(samples)]
    seen: set[str] = set()
    for i, sample_id in enumerate(ids):
        if sample_id in seen:
            raise ValueError(f"sample id {sample_id!r} appears twice (again at position {i}): "
                             f"resuming needs unique ids")
        seen.add(sample_id)
    return ids


def _remaining(ids: list[str], log: _OutputLog) -> int:
    done = log.done()
    return sum(sample_id not in done for sample_id in ids)


def _check_reference(client: Client, reference: str) -> None:
    names = [info.name for info in client.list_references()]
    if reference not in names:
        raise ValueError(f"the server has no reference {reference!r}; it has {names or 'none'}")


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue stream``."""
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--reference", required=True, metavar="NAME",
                        help="a reference resident on the server")
    parser.add_argument("--input", required=True, type=Path,
                        help="samples: a JSONL file, a parquet file or a saved dataset folder")
    parser.add_argument("--out", required=True, type=Path,
                        help="results JSONL, appended to (errors go to OUT.errors.jsonl); rerun the same "
                             "command to resume")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the server's bearer token (or set FORVALUE_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate of a private CA (implies --tls)")
    parser.add_argument("--limit", type=int, help="value at most this many new samples in this run")
    parser.add_argument("--priority", type=int, default=0, help="lower runs first on a priority server")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries when the server is unavailable or overloaded (default: 3)")


def run_stream(args: argparse.Namespace) -> int:
    """``forvalue stream``; returns the exit status (1: the server failed, rerun to resume)."""
    token = os.environ.get("FORVALUE_TOKEN")
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip()
    try:
        summary = stream_file(args.server, args.reference, args.input, args.out, token=token,
                              tls=args.tls, root_certificates=args.tls_ca, limit=args.limit,
                              priority=args.priority, retries=args.retries)
    except ServerError as error:
        print(f"forvalue: error: server {args.server}: {error}; rerun the same command to resume",
              file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"forvalue: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forvalue stream")
    add_stream_arguments(parser)
    return run_stream(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
