"""Replicated serving from one client, and Prometheus /metrics over HTTP: servers on loopback
ports with the tiny model of test_grpc. A replica killed with requests in flight loses no
sample and answers none twice; replicas with different references are never mixed; a replica
that refuses the token is left out; /metrics is scraped over HTTP."""

import asyncio
import json
import sys
import urllib.request

import pytest
from test_grpc import VALID, ServerThread, expected, valuator

from forvalue.bindings import Client
from forvalue.bindings.cli.stream import stream_file
from forvalue.bindings.client.replicas import ReplicaMismatch
from forvalue.bindings.server.metrics_http import MetricsServer

from tiny_models import random_samples


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("replicas") / "valid.safetensors"
    valuator().reference(VALID).save(path)
    return path


@pytest.fixture
def servers():
    started = []

    def start(references, **options):
        started.append(ServerThread(references, **options))
        return started[-1]

    yield start
    for server in started:
        server.close()


def scored(server):
    return server.server.engine.stats().requests.get("scored", 0)


def test_a_replica_killed_with_requests_in_flight_loses_nothing(servers, saved):
    a, b = servers({"valid": saved}), servers({"valid": saved})
    samples = random_samples(60, seed=9)
    answered, gate = [], None
    with Client([a.address, b.address], window=4) as client:
        infos = [r.list_references()[0] for r in client.replicas]
        assert infos[0].fingerprint and infos[0].fingerprint == infos[1].fingerprint
        for result in client.score_stream(samples, "valid"):
            answered.append(result)
            if gate is None and scored(a) and scored(b):  # both have answered: hold b
                gate_context = b.gated()
                gate = gate_context.__enter__()
            elif gate is not None and not gate.is_set() and b.server.engine.stats().waiting + \
                    b.server.engine.stats().running:
                b.call(b.server._server.stop(0))  # killed with requests in flight
                gate_context.__exit__(None, None, None)
    assert gate is not None and gate.is_set()
    assert sorted(r.id for r in answered) == sorted(s["id"] for s in samples)
    values = expected(9, 60)
    for r in answered:
        assert not r.error and r.value == pytest.approx(values[r.id], rel=1e-6)


def test_replicas_with_different_references_are_not_mixed(servers, saved, tmp_path):
    other = tmp_path / "other.safetensors"
    valuator().reference(VALID[:3]).save(other)
    a, b = servers({"valid": saved}), servers({"valid": other})
    with Client([a.address, b.address]) as client, pytest.raises(ReplicaMismatch, match="fingerprints"):
        list(client.score_stream(random_samples(3, seed=4), "valid"))


def test_a_replica_refusing_the_token_is_left_out(servers, saved, tmp_path):
    a, locked = servers({"valid": saved}), servers({"valid": saved}, token="secret")
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in random_samples(12, seed=7)))
    summary = stream_file(f"{a.address},{locked.address}", "valid", path, tmp_path / "out.jsonl",
                          progress=False)
    assert summary["scored"] == 12 and summary["errors"] == 0 and scored(locked) == 0


def test_metrics_are_scraped_over_http(servers, saved):
    a = servers({"valid": saved})
    with Client(a.address) as client:
        list(client.score_stream(random_samples(5, seed=3), "valid"))

    async def start():
        return MetricsServer(a.server, 0)

    metrics = a.call(start())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        metrics.close()
    for name in ("forvalue_requests_total", "forvalue_waiting_requests", "forvalue_running_requests",
                 "forvalue_step_tokens_bucket", "forvalue_request_total_seconds_bucket",
                 "forvalue_request_queue_seconds_count", "forvalue_active_streams",
                 "forvalue_refused_calls_total"):
        assert f"\n{name}" in text, name
    assert 'forvalue_requests_total{outcome="scored"} 5.0' in text


def test_metrics_without_prometheus_client_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    async def start():
        return MetricsServer(None, 0)

    with pytest.raises(ValueError, match=r"pip install 'forvalue\[metrics\]'"):
        asyncio.run(start())
