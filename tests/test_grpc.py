"""The gRPC binding on a loopback port with a tiny random model: values equal Valuator's;
every request gets exactly one result; bad samples, unknown references, auth, TLS, oversize
messages, stream and queue limits, cancellation, deadlines, drain and SIGTERM; `forvalue
stream` resumes without losing or duplicating a sample; the checked-in stubs match the proto."""

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from forvalue.bindings import AsyncClient, Client, ServerError
from forvalue.bindings import forvalue_pb2 as pb
from forvalue.bindings import forvalue_pb2_grpc as pb_grpc
from forvalue.bindings.cli.serve import add_serve_arguments, run_serve
from forvalue.bindings.cli.stream import add_stream_arguments, run_stream
from forvalue.bindings.server.server import ServerConfig, ServerLimits, ValuationServer
from forvalue.engine import Valuator, load_model

from child_process import Child
from tiny_models import random_samples, tiny_model

BINDINGS = Path(__file__).resolve().parents[1] / "bindings"


@functools.cache
def model():
    return load_model(tiny_model("untied", seed=21), dtype=torch.float64)


@functools.cache
def valuator():
    return Valuator(model(), progress=False)


VALID = random_samples(6, seed=2)
TRAIN = random_samples(40, seed=1)


@functools.cache
def expected(seed, n):
    """Offline values of random_samples(n, seed) against VALID, by id."""
    samples = random_samples(n, seed=seed)
    values = valuator().score(samples, valuator().reference(VALID))
    return {s["id"]: v for s, v in zip(samples, values, strict=True)}


class ServerThread:
    """A ValuationServer on its own event loop in a background thread."""

    def __init__(self, references, *, token=None, tls=None, load=True, **limits):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cert, key = tls or (None, None)
        config = ServerConfig(port=0, token=token, tls_cert=cert, tls_key=key, limits=ServerLimits(**limits))
        self.server = ValuationServer(config, {"max_batch_tokens": 64})
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        if load:
            self.load(references)

    def load(self, references):
        self.call(self.server.load(model(), references))

    def call(self, coroutine, timeout=60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self):
        self.call(self.server.drain(grace=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def stats(self):
        with Client(self.address) as client:
            return client.stats()

    @contextlib.contextmanager
    def gated(self):
        """Hold the engine's worker at the start of each step until the gate opens."""
        runner = self.server.engine.runner
        execute, gate = runner.execute, threading.Event()

        def held(step):
            gate.wait(30)
            return execute(step)

        runner.execute = held
        try:
            yield gate
        finally:
            gate.set()
            runner.execute = execute


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc")
    valid = folder / "valid.jsonl"
    valid.write_text("".join(json.dumps(s) + "\n" for s in VALID))
    saved = folder / "valid.safetensors"
    valuator().reference(VALID).save(saved)
    return {"folder": folder, "valid": valid, "saved": saved}


@pytest.fixture(scope="module")
def shared(files):
    server = ServerThread({"valid": files["valid"], "saved": files["saved"]})
    yield server
    server.close()


@pytest.fixture
def make_server(files):
    started = []

    def make(**options):
        started.append(ServerThread({"valid": files["valid"]}, **options))
        return started[-1]

    yield make
    for server in started:
        server.close()


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def counts(server):
    return server.stats()["requests"]


def in_engine(server):
    stats = server.stats()
    return stats["waiting"] + stats["running"]


def streamed_in_thread(client, samples, **options):
    """Run a score_stream in a thread; returns (results list, outcome dict, thread)."""
    results, outcome = [], {}

    def consume():
        try:
            results.extend(client.score_stream(samples, **options))
        except ServerError as error:
            outcome["error"] = error

    thread = threading.Thread(target=consume)
    thread.start()
    return results, outcome, thread


def held_open(samples, release):
    """Samples, then a client that keeps the stream open (no half-close) until ``release``."""
    yield from samples
    release.wait(30)


# ---------------------------------------------------------------------- stubs


# The versions of protoc and grpcio-tools stamped into the stubs: not the proto's content.
VERSION_STAMPS = re.compile(r"# Protobuf Python Version: .*|ValidateProtobufRuntimeVersion\([^)]*\)"
                            r"|GRPC_GENERATED_VERSION = .*")


def test_checked_in_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="regenerating the stubs needs grpcio-tools (test extra)")
    from forvalue.bindings.protos import STUBS, generate

    generate(tmp_path)
    for name in STUBS:
        fresh, checked_in = (VERSION_STAMPS.sub("", (d / name).read_text()) for d in (tmp_path, BINDINGS))
        assert fresh == checked_in, f"bindings/{name} is stale: run `python -m forvalue.bindings.protos`"


# ---------------------------------------------------------------------- values


def test_scores_match_the_valuator_and_every_id_comes_back_once(shared):
    v = valuator()
    values, tokens = v.score(TRAIN, v.reference(VALID), token_values=True)
    with Client(shared.address) as client:
        assert client.health() == "SERVING"
        assert {r.name: r.count for r in client.list_references()} == {"valid": 6, "saved": 6}
        for reference in ("valid", "saved"):  # built from JSONL at start-up; loaded from a file
            results = list(client.score_stream(TRAIN, reference=reference, token_values=True))
            assert sorted(r.id for r in results) == sorted(s["id"] for s in TRAIN)
            by_id = {r.id: r for r in results}
            for sample, value, tv in zip(TRAIN, values, tokens, strict=True):
                r = by_id[sample["id"]]
                assert r.error == "" and r.num_tokens == len(sample["input_ids"])
                assert r.value == pytest.approx(value, rel=1e-6)
                np.testing.assert_allclose(r.token_values.values, tv.values, rtol=1e-6,
                                           atol=1e-9 * np.abs(tv.values).max())
                np.testing.assert_array_equal(r.token_values.positions, tv.positions)


def test_structured_samples_and_the_async_client(shared):
    sample = TRAIN[0]
    fields = pb.Sample(input_ids=sample["input_ids"], loss_mask=sample["loss_mask"])
    with grpc.insecure_channel(shared.address) as channel:
        (result,) = pb_grpc.ValuationStub(channel).Score(
            iter([pb.ScoreRequest(id="x", reference="valid", fields=fields)]))
    assert result.id == "x" and result.value == pytest.approx(expected(1, 40)[sample["id"]], rel=1e-6)

    async def score_async():
        async def samples():
            for s in TRAIN[:10]:
                yield {k: v for k, v in s.items() if k != "id"}  # ids become positions

        async with AsyncClient(shared.address) as client:
            return [r async for r in client.score_stream(samples(), reference="valid")]

    results = asyncio.run(score_async())
    assert sorted(int(r.id) for r in results) == list(range(10))
    for r in results:
        assert r.index == int(r.id)
        assert r.value == pytest.approx(expected(1, 40)[TRAIN[r.index]["id"]], rel=1e-6)


def test_bad_samples_and_unknown_references_are_answered_and_the_stream_goes_on(shared):
    good = TRAIN[:3]
    bad = {
        "not-json": "{nope",
        "deep": "[" * 100_000,
        "list": "[1, 2]",
        "typo": '{"input_ids": [1, 2], "loss_mask": [0, 1], "x": 1}',
        "no-label": '{"input_ids": [1, 2], "loss_mask": [0, 0]}',
        "vocab": '{"input_ids": [1, 99999], "loss_mask": [0, 1]}',
        "long": json.dumps({"input_ids": [1] * 100, "loss_mask": [1] * 100}),
        "text": '{"text": "needs a tokenizer"}',
    }
    requests = [
        *[pb.ScoreRequest(id=s["id"], reference="valid", json=json.dumps(s)) for s in good],
        *[pb.ScoreRequest(id=name, reference="valid", json=text) for name, text in bad.items()],
        pb.ScoreRequest(id="no-sample", reference="valid"),
        pb.ScoreRequest(id="unknown", reference="nope", json=json.dumps(good[0])),
        pb.ScoreRequest(id="last", reference="valid", json=json.dumps(TRAIN[3])),
    ]
    with grpc.insecure_channel(shared.address) as channel:
        results = list(pb_grpc.ValuationStub(channel).Score(iter(requests)))
    by_id = {r.id: r for r in results}
    assert len(results) == len(by_id) == len(requests)
    for r in results:
        scored = r.id in {s["id"] for s in good} | {"last"}
        assert (r.error == "") == scored and np.isfinite(r.value) == scored, r
    assert "not valid JSON" in by_id["not-json"].error and "no sample" in by_id["no-sample"].error
    assert "unknown key" in by_id["typo"].error and "nothing to value" in by_id["no-label"].error
    assert "unknown reference 'nope'" in by_id["unknown"].error


def test_references_uploaded_listed_and_dropped(make_server):
    server = make_server(reference_chunk=2)  # the upload is built in chunks of two samples
    bad = {"id": "bad", "input_ids": [1]}
    with Client(server.address) as client:
        info = client.put_reference("up", [*VALID[:3], bad, *VALID[3:]])
        assert (info.name, info.count, info.skipped, info.version) == ("up", 6, 1, 1)
        results = list(client.score_stream(TRAIN[:8], reference="up"))
        for r in results:
            assert r.value == pytest.approx(expected(1, 40)[r.id], rel=1e-6)
        merged = client.put_reference("up", VALID[:2], merge=True)
        assert (merged.count, merged.version) == (8, 2)
        assert sorted(r.name for r in client.list_references()) == ["up", "valid"]
        assert client.drop_reference("up") and not client.drop_reference("up")
        for name, options in (("bad name!", {}), ("ok", {"normalize": "softmax"})):
            with pytest.raises(ServerError) as caught:
                client.put_reference(name, VALID, **options)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ServerError, match="no valid validation sample"):
            client.put_reference("empty", [bad])
        assert [r.name for r in client.list_references()] == ["valid"]  # no upload left over


def test_stats_health_and_reflection(shared):
    with Client(shared.address) as client:
        list(client.score_stream(TRAIN[:2], reference="valid"))
        stats = client.stats()
        assert client.health("forvalue.v1.Valuation") == "SERVING"
    assert stats["requests"]["scored"] >= 2 and stats["latency"]["total"]["p50"] >= 0
    assert 'forvalue_requests_total{outcome="scored"}' in stats["prometheus_text"]
    assert "forvalue_active_streams" in stats["prometheus_text"]
    with grpc.insecure_channel(shared.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"forvalue.v1.Valuation", "grpc.health.v1.Health"} <= set(services)


def test_health_says_serving_only_once_loaded(make_server, files):
    server = make_server(load=False)
    with Client(server.address) as client:
        assert client.health() == client.health("forvalue.v1.Valuation") == "NOT_SERVING"
        with pytest.raises(ServerError, match="loading") as caught:
            list(client.score_stream(TRAIN[:1], reference="valid"))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        server.load({"valid": files["valid"]})
        assert client.health() == "SERVING"
        assert len(list(client.score_stream(TRAIN[:1], reference="valid"))) == 1


def test_a_failing_samples_iterable_raises_after_the_results_of_what_was_sent(shared):
    def samples():
        yield from TRAIN[:3]
        raise KeyError("broken input")

    results = []
    with Client(shared.address) as client, pytest.raises(KeyError, match="broken input"):
        results.extend(client.score_stream(samples(), reference="valid"))
    assert sorted(r.id for r in results) == sorted(s["id"] for s in TRAIN[:3])


# ---------------------------------------------------------------------- security and limits


def test_every_call_needs_the_bearer_token(make_server):
    server = make_server(token="s3cret")
    for token in (None, "wrong"):
        with Client(server.address, token=token) as client:
            for call in (client.list_references, client.health, client.stats,
                         lambda c=client: list(c.score_stream(TRAIN[:2], reference="valid")),
                         lambda c=client: c.put_reference("x", VALID)):
                with pytest.raises(ServerError) as caught:
                    call()
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(server.address, token="s3cret") as client:
        assert len(list(client.score_stream(TRAIN[:2], reference="valid"))) == 2
    assert server.server.counters["unauthenticated"] == 10


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_with_a_token(make_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    server = make_server(token="t", tls=(cert, key))
    with Client(server.address, token="t", root_certificates=cert) as client:
        assert len(list(client.score_stream(TRAIN[:3], reference="valid"))) == 3
    with Client(server.address, token="t", timeout=5) as plaintext, pytest.raises(ServerError) as caught:
        plaintext.list_references()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_oversize_messages_are_refused_and_the_server_goes_on(make_server):
    server = make_server(max_message_bytes=64 * 1024)
    big = {"id": "big", "input_ids": [1] * 30_000, "loss_mask": [1] * 30_000}  # ~180 KB of JSON
    with Client(server.address) as client:
        with pytest.raises(ServerError) as caught:
            list(client.score_stream([TRAIN[0], big], reference="valid"))
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(ServerError) as caught:
            client.put_reference("big", [big])
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(list(client.score_stream(TRAIN[:3], reference="valid"))) == 3


def test_streams_over_the_limit_are_refused(make_server):
    server = make_server(max_streams=2)
    release = threading.Event()
    with Client(server.address) as client:
        held = [streamed_in_thread(client, held_open(TRAIN[i:i + 1], release), reference="valid")
                for i in range(2)]
        wait_for(lambda: server.server.open_calls == 2)
        with pytest.raises(ServerError) as caught:
            list(client.score_stream(TRAIN[:1], reference="valid"))
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.list_references()  # unary calls still go through
        release.set()
        for results, outcome, thread in held:
            thread.join(30)
            assert len(results) == 1 and not outcome
        assert len(list(client.score_stream(TRAIN[:1], reference="valid"))) == 1


def test_a_full_queue_ends_the_stream_with_resource_exhausted_after_answering_what_it_took(make_server):
    server = make_server(max_queue=4, queue_timeout=0.2)
    with server.gated() as gate, Client(server.address) as client:
        results, outcome, thread = streamed_in_thread(client, TRAIN[:20], reference="valid")
        wait_for(lambda: any(s.status for s in list(server.server.streams)))
        gate.set()
        thread.join(30)
    assert outcome["error"].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 4 <= len(results) < 20 and len({r.id for r in results}) == len(results)
    assert all(r.error == "" for r in results)
    assert server.stats()["waiting"] == 0


# ---------------------------------------------------------------------- cancellation


def test_leaving_a_stream_early_cancels_its_queued_work(make_server):
    server = make_server()
    bad = {"id": "bad", "input_ids": [1]}  # answered at once, while the rest is held
    with server.gated() as gate, Client(server.address) as client:
        stream = client.score_stream([bad, *TRAIN[:30]], reference="valid")
        assert next(stream).id == "bad"
        wait_for(lambda: in_engine(server) == 30)
        stream.close()  # the caller walks away
        wait_for(lambda: counts(server).get("cancelled", 0) == 30)
        assert server.stats()["waiting"] == 0
        gate.set()
        assert len(list(client.score_stream(TRAIN[:5], reference="valid"))) == 5
    wait_for(lambda: in_engine(server) == 0)


def test_deadlines_are_honoured(make_server):
    server = make_server()
    with server.gated(), Client(server.address) as client:
        with pytest.raises(ServerError) as caught:
            list(client.score_stream(TRAIN[:10], reference="valid", timeout=0.5))
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: counts(server).get("cancelled", 0) + counts(server).get("expired", 0) == 10)
    wait_for(lambda: in_engine(server) == 0)


# ---------------------------------------------------------------------- load and lifecycle


def test_sixteen_concurrent_clients_lose_and_duplicate_nothing(shared):
    def run(k):
        samples = random_samples(50, seed=100 + k)
        with Client(shared.address) as client:
            return k, list(client.score_stream(samples, reference="valid"))

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(run, range(16)))
    for k, results in outcomes:
        values = expected(100 + k, 50)
        assert sorted(r.id for r in results) == sorted(values)
        for r in results:
            assert r.error == "" and r.value == pytest.approx(values[r.id], rel=1e-6)


def test_drain_answers_what_was_accepted_and_refuses_new_calls(make_server):
    server = make_server()
    end, release = threading.Event(), threading.Event()
    with server.gated() as gate, Client(server.address) as client:
        closed = streamed_in_thread(client, TRAIN[:20], reference="valid")
        ends_in_drain = streamed_in_thread(client, held_open(TRAIN[25:30], end), reference="valid")
        still_open = streamed_in_thread(client, held_open(TRAIN[20:25], release), reference="valid")
        wait_for(lambda: in_engine(server) == 30)
        draining = asyncio.run_coroutine_threadsafe(server.server.drain(grace=30), server.loop)
        wait_for(lambda: server.server.draining)
        end.set()  # this caller's end reaches the server while its answers are still held back
        wait_for(lambda: sum(stream._reader.done() for stream in list(server.server.streams)) == 2)
        time.sleep(0.3)  # the whole drain window, not only its first instant, refuses with UNAVAILABLE
        with Client(server.address, timeout=5) as late, pytest.raises(ServerError) as caught:
            list(late.score_stream(TRAIN[:1], reference="valid"))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "draining" in str(caught.value)  # refused by the servicer, not a closed socket
        gate.set()
        draining.result(30)
        release.set()
        for _, _, thread in (closed, ends_in_drain, still_open):
            thread.join(30)
    # half-closed before or during the drain: everything answered, OK
    assert len(closed[0]) == 20 and not closed[1]
    assert len(ends_in_drain[0]) == 5 and not ends_in_drain[1]
    assert len(still_open[0]) == 5  # still sending: its accepted requests answered, then UNAVAILABLE
    assert still_open[1]["error"].code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("option", "message"), [("--max-queue-delay-ms=-1", "max-queue-delay-ms"),
                                               ("--max-streams=0", "must be positive")])
def test_forvalue_serve_refuses_bad_limits_in_one_line(option, message, capsys):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert run_serve(parser.parse_args([option])) == 2
    error = capsys.readouterr().err
    assert error.startswith("forvalue: error:") and message in error and "Traceback" not in error


@pytest.mark.slow
def test_forvalue_serve_drains_on_sigterm(files, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("untied", seed=21).save_pretrained(folder)
    with Child([sys.executable, "-m", "forvalue.bindings.cli", "serve", "--model", str(folder), "--port",
                "0", "--reference", f"valid={files['valid']}", "--dtype", "float64"],
               env={**os.environ, "PYTHONUNBUFFERED": "1"}) as server:
        server.wait_for(lambda: "serving on" in server.stderr(), "the server listens")
        serving = next(line for line in server.stderr().splitlines() if "serving on" in line)
        with Client(serving.rsplit(" ", 1)[-1].strip()) as client:
            assert len(list(client.score_stream(TRAIN[:5], reference="valid"))) == 5
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        assert "draining" in server.stderr()


# ---------------------------------------------------------------------- forvalue stream


def stream_command(server, input_path, out, *extra):
    parser = argparse.ArgumentParser()
    add_stream_arguments(parser)
    return run_stream(parser.parse_args(["--server", server.address, "--reference", "valid", "--input",
                                         str(input_path), "--out", str(out), *extra]))


def test_forvalue_stream_resumes_without_losing_or_duplicating(shared, tmp_path):
    samples = random_samples(50, seed=7)
    for sample in samples[:5]:
        del sample["id"]  # named by their line position
    bad = {"id": "bad", "input_ids": [3]}
    input_path, out = tmp_path / "train.jsonl", tmp_path / "values.jsonl"
    input_path.write_text("".join(json.dumps(s) + "\n" for s in [*samples, bad]))
    errors = out.with_name("values.errors.jsonl")

    assert stream_command(shared, input_path, out, "--limit", "20") == 0
    first = out.read_text().splitlines()
    assert len(first) == 20
    with out.open("a") as f:
        f.write('{"id": "s7-3')  # torn by a kill
    assert stream_command(shared, input_path, out) == 0
    assert stream_command(shared, input_path, out) == 0  # nothing left: nothing written

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_text().splitlines()[:20] == first
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 50
    assert [json.loads(line)["id"] for line in errors.read_text().splitlines()] == ["bad"]
    values = valuator().score(samples, valuator().reference(VALID))
    names = [str(i) for i in range(5)] + [s["id"] for s in samples[5:]]
    by_id = {r["id"]: r for r in records}
    for name, value, index in zip(names, values, range(50), strict=True):
        assert by_id[name]["index"] == index and by_id[name]["value"] == pytest.approx(value, rel=1e-6)


def test_forvalue_stream_refuses_the_out_of_another_input(shared, tmp_path, capsys):
    first, second, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "values.jsonl"
    first.write_text("".join(json.dumps(s) + "\n" for s in random_samples(4, seed=8)))
    second.write_text("".join(json.dumps(s) + "\n" for s in random_samples(4, seed=9)))
    assert stream_command(shared, first, out) == 0
    before = out.read_text()
    assert stream_command(shared, second, out) == 2
    error = capsys.readouterr().err
    assert "holds values of another job" in error and "input: recorded" in error and "b.jsonl" in error
    assert out.read_text() == before
    assert stream_command(shared, second, out, "--overwrite") == 0
    assert {json.loads(line)["id"] for line in out.read_text().splitlines()} == \
        {json.loads(line)["id"] for line in second.read_text().splitlines()}


def test_forvalue_stream_reports_an_unknown_reference_and_a_dead_server(shared, tmp_path, capsys):
    input_path = tmp_path / "train.jsonl"
    input_path.write_text(json.dumps(TRAIN[0]) + "\n")
    parser = argparse.ArgumentParser()
    add_stream_arguments(parser)
    args = ["--input", str(input_path), "--out", str(tmp_path / "out.jsonl")]
    assert run_stream(parser.parse_args(["--server", shared.address, "--reference", "nope", *args])) == 2
    assert "no reference 'nope'" in capsys.readouterr().err
    dead = parser.parse_args(["--server", "127.0.0.1:1", "--reference", "valid", "--retries", "0", *args])
    assert run_stream(dead) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
