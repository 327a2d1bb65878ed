"""Query on a server started with an index (``forvalue serve --index IDX``): each streamed
sample's answer equals ``Index.query``'s, in order, beside Score on the same model; a bad sample
is answered with its error and the stream goes on; ``forvalue stream --query`` writes the
answers and resumes; a metadata filter gives what the index gives with it; a server without an
index refuses Query."""

import asyncio
import json
import threading

import grpc
import pytest
import torch

from forvalue.bindings import AsyncClient, Client, ServerError
from forvalue.bindings.cli import main
from forvalue.bindings.server.server import ServerConfig, ValuationServer
from forvalue.engine import Index, ValuationConfig, load_model

from tiny_models import random_samples, tiny_model

TRAIN = [dict(s, meta={"half": i % 2}) for i, s in enumerate(random_samples(12, seed=96))]
VALID = random_samples(3, seed=97)


class Server:
    """A ValuationServer on its own event loop in a background thread."""

    def __init__(self, model, index=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ValuationServer(ServerConfig(port=0), {"max_batch_tokens": 64})
        self.address = f"127.0.0.1:{self.call(self.server.start())}"
        self.call(self.server.load(model, {"valid": VALID}, index=index))

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def close(self):
        self.call(self.server.drain(grace=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = load_model(tiny_model("untied", seed=98), dtype=torch.float64)
    folder = tmp_path_factory.mktemp("served") / "index"
    Index.build(TRAIN, folder, model=model, config=ValuationConfig(batch_tokens=64), sketch_rows=32,
                progress=False)
    server = Server(model, folder)
    yield server, Index.open(folder, model, progress=False)
    server.close()


def test_query_answers_what_the_index_answers_beside_score(served):
    server, index = served
    expected = index.query(VALID, top=3)
    queries = [*VALID[:2], {"id": "bad", "input_ids": [1], "loss_mask": [1]}, VALID[2]]
    with Client(server.address) as client:
        answers = list(client.query_stream(queries, top=3))
        scored = list(client.score_stream(VALID, reference="valid"))
    assert [a.id for a in answers] == [s["id"] for s in VALID[:2]] + ["bad", VALID[2]["id"]]
    assert "bad" in answers[2].id and answers[2].error and not answers[2].most
    for answer, want in zip([answers[0], answers[1], answers[3]], expected, strict=True):
        assert answer.error == ""
        assert [i for i, _ in answer.most] == [n["id"] for n in want["most"]]
        assert [v for _, v in answer.least] == pytest.approx([n["value"] for n in want["least"]], rel=1e-5)
    assert len(scored) == 3 and all(r.error == "" for r in scored)

    async def first_async():
        async with AsyncClient(server.address) as client:
            return [a async for a in client.query_stream(VALID[:1], top=2)]

    (answer,) = asyncio.run(first_async())
    assert [i for i, _ in answer.most] == [n["id"] for n in expected[0]["most"][:2]]


def test_query_filters_on_the_stored_metadata(served, tmp_path):
    server, index = served
    expected = index.query(VALID, top=2, where={"half": ["1"]})
    odd = {s["id"] for s in TRAIN if s["meta"]["half"] == 1}
    with Client(server.address) as client:
        answers = list(client.query_stream(VALID, top=2, where=["half=1"]))
        (malformed,) = client.query_stream(VALID[:1], where=["half"])
    for answer, want in zip(answers, expected, strict=True):
        found = [i for i, _ in answer.most]
        assert found == [n["id"] for n in want["most"]] and set(found) <= odd
    assert "KEY=VALUE" in malformed.error
    out = tmp_path / "odd.jsonl"
    samples = tmp_path / "answers.jsonl"
    samples.write_text("".join(json.dumps(s) + "\n" for s in VALID))
    assert main(["stream", "--server", server.address, "--query", "--top", "2", "--where", "half=1",
                 "--input", str(samples), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    wanted = [[n["id"] for n in answer["most"]] for answer in expected]
    assert [[i for i, _ in line["most"]] for line in lines] == wanted


def test_a_server_without_an_index_refuses_query():
    server = Server(load_model(tiny_model("untied", seed=99), dtype=torch.float64))
    try:
        with Client(server.address) as client, pytest.raises(ServerError) as raised:
            list(client.query_stream(VALID))
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--index" in str(raised.value)
    finally:
        server.close()


def test_forvalue_stream_query_writes_and_resumes(served, tmp_path, capsys):
    server, index = served
    samples = tmp_path / "answers.jsonl"
    samples.write_text("".join(json.dumps(s) + "\n" for s in VALID))
    out = tmp_path / "why.jsonl"
    command = ["stream", "--server", server.address, "--query", "--top", "2", "--input", str(samples),
               "--out", str(out)]
    assert main([*command, "--limit", "1"]) == 0
    assert main(command) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [s["id"] for s in VALID]
    expected = index.query(VALID, top=2)
    found = [[stored for stored, _ in line["most"]] for line in lines]
    assert found == [[n["id"] for n in answer["most"]] for answer in expected]
    assert main(["stream", "--server", server.address, "--reference", "valid", "--input", str(samples),
                 "--out", str(out)]) == 2
    assert "holds values of another job" in capsys.readouterr().err
