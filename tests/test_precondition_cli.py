"""The preconditioned value through every way in: `forvalue covariance`, `score`/`select`/`serve`
with --precondition/--damping/--covariance, gRPC PutReference, and the refusals of bad input."""

import asyncio
import json

import numpy as np
import pytest
import torch

from forvalue.bindings import Client
from forvalue.bindings.cli import main
from forvalue.bindings.server.server import ServerConfig, ValuationServer
from forvalue.engine import Valuator, load_model

from tiny_models import random_samples, tiny_model

TRAIN, VALID, POOL = random_samples(12, seed=71), random_samples(4, seed=72), random_samples(10, seed=73)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("precondition")
    tiny_model("untied", seed=70).save_pretrained(root / "model")
    tiny_model("untied", seed=79).save_pretrained(root / "other")
    for name, rows in (("train", TRAIN), ("valid", VALID), ("pool", POOL),
                       ("unlabelled", [{"input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]}])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def model_args(root, name="model"):
    return ["--model", str(root / name), "--dtype", "float64"]


def values_of(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return np.array([r["value"] for r in sorted(rows, key=lambda r: r["index"])])


def loaded(root, name="model"):
    return load_model(str(root / name), dtype=torch.float64)


def test_covariance_then_score_and_select_with_it(workdir, capsys):
    cov = workdir / "pool.safetensors"
    assert main(["covariance", *model_args(workdir), "--train", str(workdir / "pool.jsonl"),
                 "--out", str(cov)]) == 0
    assert "effective_rank" in capsys.readouterr().out
    options = ["--precondition", "input", "--damping", "0.05", "--covariance", str(cov)]
    out = workdir / "scores.jsonl"
    assert main(["score", *model_args(workdir), "--train", str(workdir / "train.jsonl"),
                 "--valid", str(workdir / "valid.jsonl"), "--out", str(out), *options]) == 0
    v = Valuator(loaded(workdir), precondition="input", damping=0.05, covariance=POOL, progress=False)
    expected = v.score(TRAIN, v.reference(VALID))
    np.testing.assert_allclose(values_of(out), expected, rtol=1e-9)
    selected = workdir / "selected.jsonl"
    assert main(["select", *model_args(workdir), "--train", str(workdir / "train.jsonl"),
                 "--valid", str(workdir / "valid.jsonl"), "--ratio", "0.25", "--out", str(selected),
                 "--normalize", "none", "--skip-depth", "none", *options]) == 0  # the readout off
    chosen = [json.loads(line)["id"] for line in selected.read_text().splitlines()]
    assert chosen == [TRAIN[i]["id"] for i in sorted(np.argsort(-expected)[:3])]


def test_select_defaults_to_the_preconditioned_cosine_value_with_the_readout(workdir):
    selected = workdir / "default.jsonl"
    assert main(["select", *model_args(workdir), "--train", str(workdir / "train.jsonl"),
                 "--valid", str(workdir / "valid.jsonl"), "--ratio", "0.25", "--out", str(selected)]) == 0
    v = Valuator(loaded(workdir), normalize="cosine", precondition="input", skip_depth=0.75, progress=False)
    expected = v.score(TRAIN, v.reference(VALID))
    chosen = [json.loads(line)["id"] for line in selected.read_text().splitlines()]
    assert chosen == [TRAIN[i]["id"] for i in sorted(np.argsort(-expected)[:3])]


def test_pairwise_and_self_modes_take_the_flags(workdir):
    for mode, expected in (("pairwise", None), ("self", None)):
        out = workdir / f"{mode}.jsonl"
        assert main(["score", *model_args(workdir), "--train", str(workdir / "train.jsonl"),
                     "--valid", str(workdir / "valid.jsonl"), "--out", str(out), "--mode", mode,
                     "--precondition", "input", "--normalize", "cosine"]) == 0
        v = Valuator(loaded(workdir), normalize="cosine", precondition="input", progress=False)
        expected = v.pairwise(TRAIN, VALID) if mode == "pairwise" else v.self_value(TRAIN)
        rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
        got = np.array([r["values"] if mode == "pairwise" else r["value"] for r in rows])
        np.testing.assert_allclose(got, expected, rtol=1e-9)


@pytest.mark.parametrize(("extra", "message"), [
    (["--precondition", "input", "--damping", "0"], "damping must be > 0"),
    (["--damping", "0.1"], "damping is an option of precondition='input'"),
    (["--covariance", "x.safetensors"], "--covariance goes with --precondition input"),
])
def test_bad_flags_end_with_one_line(workdir, capsys, extra, message):
    status = main(["score", *model_args(workdir), "--train", str(workdir / "train.jsonl"),
                   "--valid", str(workdir / "valid.jsonl"), "--out", str(workdir / "bad.jsonl"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0]


def test_mismatched_files_are_refused(workdir, capsys):
    foreign = workdir / "foreign.safetensors"
    assert main(["covariance", *model_args(workdir, "other"), "--train", str(workdir / "pool.jsonl"),
                 "--out", str(foreign)]) == 0
    base = ["score", *model_args(workdir), "--train", str(workdir / "train.jsonl"), "--out",
            str(workdir / "refused.jsonl")]
    assert main([*base, "--valid", str(workdir / "valid.jsonl"), "--precondition", "input",
                 "--covariance", str(foreign)]) == 2
    assert "covariance was built differently" in capsys.readouterr().err
    all_tokens = workdir / "all.safetensors"
    assert main(["covariance", *model_args(workdir), "--loss-on", "all", "--train",
                 str(workdir / "pool.jsonl"), "--out", str(all_tokens)]) == 0
    assert main([*base, "--valid", str(workdir / "valid.jsonl"), "--precondition", "input",
                 "--covariance", str(all_tokens)]) == 2
    assert "loss_on" in capsys.readouterr().err
    preconditioned = workdir / "preconditioned.safetensors"
    Valuator(loaded(workdir), precondition="input", progress=False).reference(VALID).save(preconditioned)
    assert main([*base, "--valid", str(preconditioned)]) == 2  # valued without the preconditioner
    assert "precondition" in capsys.readouterr().err
    assert main(["covariance", *model_args(workdir), "--train", str(workdir / "unlabelled.jsonl"),
                 "--out", str(workdir / "empty.safetensors")]) == 2
    assert "no valid sample" in capsys.readouterr().err


def test_serve_and_put_reference_with_preconditioning(workdir):
    model = loaded(workdir)
    covariance = Valuator(model, progress=False).covariance(POOL)
    plain = Valuator(model, precondition="input", progress=False)
    pooled = Valuator(model, precondition="input", covariance=covariance, progress=False)
    cosine = Valuator(model, normalize="cosine", precondition="input", progress=False)

    async def main_loop():
        server = ValuationServer(ServerConfig(port=0), {"precondition": "input", "batch_tokens": 64})
        port = await server.start()
        await server.load(model, {"valid": VALID}, covariances={"pool": covariance})
        try:
            return await asyncio.to_thread(calls, f"127.0.0.1:{port}")
        finally:
            await server.drain(grace=5)

    def calls(address):
        with Client(address) as client:
            own = client.put_reference("own", VALID, covariance="valid")
            whole = client.put_reference("cos", VALID, normalize="cosine", covariance="valid")
            with pytest.raises(Exception, match="unknown covariance"):
                client.put_reference("bad", VALID, covariance="nope")
            with pytest.raises(Exception, match="damping must be > 0"):
                client.put_reference("bad", VALID, damping=-1.0)
            infos = {info.name: info for info in client.list_references()}
            got = {}
            for name in ("valid", "own", "cos"):  # results come in completion order: by id
                by_id = {r.id: r.value for r in client.score_stream(TRAIN, reference=name)}
                got[name] = [by_id[s["id"]] for s in TRAIN]
            return own, whole, infos, got

    own, whole, infos, got = asyncio.run(main_loop())
    # The server's default covariance is the one it was given: "valid" is built with the pool's A.
    np.testing.assert_allclose(got["valid"], pooled.score(TRAIN, pooled.reference(VALID)), rtol=1e-9)
    np.testing.assert_allclose(got["own"], plain.score(TRAIN, plain.reference(VALID)), rtol=1e-9)
    np.testing.assert_allclose(got["cos"], cosine.score(TRAIN, cosine.reference(VALID)), rtol=1e-9)
    assert (own.precondition, own.covariance, own.damping) == ("input", "valid", 0.01)
    assert infos["valid"].covariance.startswith("file ") and infos["valid"].damping == 0.1
    assert whole.count == len(VALID) and whole.normalize == "cosine"
