"""Scoring on several replicas of the server from one client (``Client(["a:50051", "b:50051"])``).

A Score call is pinned to one connection, so spreading whole calls (gRPC's round_robin) leaves a
single stream on one replica. Here one stream is kept per replica that is ready (the standard
health service says SERVING, and it holds the reference), each with at most ``window`` requests
unanswered; the next sample goes to the replica with the most room. When a replica's stream
fails, its unanswered requests are sent again to the others; results are matched by an
internal sequence number, so a sample is answered once even if two replicas answer it.
Replicas whose reference fingerprints differ are never mixed (they would value differently).
Like the client SDK, this imports only grpc, numpy and the wire modules.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc

from .. import forvalue_pb2 as pb
from ..wire import Result
from .errors import ServerError

END = None  # closes a replica's request stream


class ReplicaMismatch(ValueError):
    """Replicas that would value the same sample differently (different reference fingerprints)."""


class _Replica:
    """One replica's Score stream: requests from a queue, results and its end onto ``events``."""

    def __init__(self, client: Any, events: queue.Queue) -> None:
        self.client = client
        self.events = events
        self.requests: queue.Queue = queue.Queue()
        self.inflight: dict[str, pb.ScoreRequest] = {}  # wire id -> request, unanswered
        self.alive = True
        self.call: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self, timeout: float | None) -> None:
        self.call = self.client._stub.Score(self._requests(), metadata=self.client.metadata, timeout=timeout)
        self.thread.start()

    def _requests(self) -> Iterator[pb.ScoreRequest]:
        while (request := self.requests.get()) is not END:
            yield request

    def _run(self) -> None:
        error = None
        try:
            for message in self.call:
                self.events.put(("result", self, message))
        except grpc.RpcError as failure:
            error = failure
        self.events.put(("ended", self, error))

    def send(self, request: pb.ScoreRequest) -> None:
        self.inflight[request.id] = request
        self.requests.put(request)

    def close(self) -> None:
        self.requests.put(END)


def ready_replicas(clients: list[Any], reference: str) -> list[Any]:
    """The clients whose server is SERVING and holds ``reference``, all with one fingerprint.
    Raises ServerError (the last failure) when none is ready, ReplicaMismatch when they differ."""

    ready, prints, failure = [], {}, None
    for client in clients:
        try:
            if client.health() != "SERVING":
                continue
            infos = {info.name: info for info in client.list_references()}
        except ServerError as error:
            failure = error
            continue
        if reference in infos:
            ready.append(client)
            prints[client.address] = infos[reference].fingerprint
    if not ready:
        if failure is not None:
            raise failure
        raise ServerError(grpc.StatusCode.UNAVAILABLE,
                          f"no replica of {[c.address for c in clients]} serves reference {reference!r}")
    if len(set(prints.values())) > 1:
        raise ReplicaMismatch(f"replicas hold different references named {reference!r} (fingerprints "
                              f"{prints}); give them the same reference file")
    return ready


def score_stream(clients: list[Any], tracker: Any, samples: Iterable[Mapping[str, Any]], *, window: int,
                 timeout: float | None) -> Iterator[Result]:
    """Results of ``samples`` over the ready replicas, each sample answered once."""

    events: queue.Queue = queue.Queue()
    replicas = [_Replica(client, events) for client in ready_replicas(clients, tracker.reference)]
    for replica in replicas:
        replica.start(timeout)
    resend: collections.deque[pb.ScoreRequest] = collections.deque()
    pending = tracker.requests(samples)
    exhausted, failure = False, None
    try:
        while True:
            exhausted = _dispatch(replicas, resend, pending, window, exhausted)
            if exhausted and not resend and not tracker.ids:
                break
            live = [r for r in replicas if r.alive]
            if not live:
                raise ServerError.from_rpc(failure) if failure is not None else ServerError(
                    grpc.StatusCode.UNAVAILABLE, "every replica failed")
            kind, replica, payload = events.get()
            if kind == "result":
                request = replica.inflight.pop(payload.id, None)
                if request is not None and payload.id in tracker.ids:  # else: answered already
                    yield tracker.result(payload)
            else:
                failure = payload or failure
                replica.alive = False
                resend.extend(r for key, r in replica.inflight.items() if key in tracker.ids)
                replica.inflight.clear()
    finally:
        for replica in replicas:
            replica.close()
            if replica.call is not None:
                replica.call.cancel()
    tracker.check()


def _dispatch(replicas: list[_Replica], resend: collections.deque, pending: Iterator[pb.ScoreRequest],
              window: int, exhausted: bool) -> bool:
    """Send what there is room for (re-sends first) to the live replica with the most room;
    returns whether the samples are exhausted."""
    while True:
        live = [r for r in replicas if r.alive and len(r.inflight) < window]
        if not live:
            return exhausted
        if resend:
            request = resend.popleft()
        elif exhausted:
            return True
        else:
            request = next(pending, None)
            if request is None:
                return True
        min(live, key=lambda r: len(r.inflight)).send(request)
