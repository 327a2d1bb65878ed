"""``forvalue score --ray`` on a local two-CPU Ray (one ray.init for the module) with a tiny
random model saved to a folder: values equal the single-process job's, every id once, errors
per sample, an actor that dies mid-job is retried, resumed runs redo nothing, the parquet ways
in and out, the Ray-built covariance, and the one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from forvalue.bindings.cli import main
from forvalue.bindings.ray_jobs import pool as ray_jobs
from forvalue.engine import Covariance, Index, Valuator, load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.inputs.readers import read_samples

from tiny_models import random_samples, tiny_model

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

N_TRAIN = 40


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The model folder, samples files, a crash flag path the actors know of, and Ray."""
    root = tmp_path_factory.mktemp("ray")
    tiny_model("untied", seed=3).save_pretrained(root / "model")
    train = random_samples(N_TRAIN, seed=5)
    train[7] = {"id": "no-labels", "input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]}  # a per-sample error
    write_jsonl(root / "train.jsonl", train, blank_after=3)
    write_jsonl(root / "valid.jsonl", random_samples(6, seed=6))
    flag = root / "crash.flag"
    os.environ[ray_jobs.CRASH_FLAG_ENV] = str(flag)  # inherited by the workers ray.init starts
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield {"root": root, "model": str(root / "model"), "train": train, "flag": flag}
    ray.shutdown()
    os.environ.pop(ray_jobs.CRASH_FLAG_ENV, None)


def write_jsonl(path, samples, blank_after=None):
    lines = [json.dumps(s) for s in samples]
    if blank_after is not None:
        lines.insert(blank_after, "   ")  # skipped, as the local reader skips it
    path.write_text("\n".join(lines) + "\n")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def score(job, out, *extra):
    return main(["score", "--model", job["model"], "--dtype", "float32",
                 "--train", str(job["root"] / "train.jsonl"), "--out", str(out), "--checkpoint", "8", *extra])


def check_same(local, distributed):
    """The same ids once each, in input order, values within float32 summation error."""
    assert [r["index"] for r in distributed] == sorted({r["index"] for r in distributed})
    assert [r["id"] for r in distributed] == [r["id"] for r in local]
    a = np.array([r["value"] for r in local])
    b = np.array([r["value"] for r in distributed])
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) <= 1e-6


def test_ray_values_equal_the_local_job_and_resume_redoes_nothing(job, tmp_path):
    valid = ["--valid", str(job["root"] / "valid.jsonl")]
    assert score(job, tmp_path / "local.jsonl", *valid) == 0
    assert score(job, tmp_path / "ray.jsonl", *valid, "--ray", "--actors", "2") == 0
    local, distributed = read_jsonl(tmp_path / "local.jsonl"), read_jsonl(tmp_path / "ray.jsonl")
    assert len(distributed) == N_TRAIN - 1
    check_same(local, distributed)
    errors = read_jsonl(tmp_path / "ray.errors.jsonl")
    assert [(e["id"], e["index"]) for e in errors] == [("no-labels", 7)]
    assert errors == read_jsonl(tmp_path / "local.errors.jsonl")
    before = (tmp_path / "ray.jsonl").read_text()
    assert score(job, tmp_path / "ray.jsonl", *valid, "--ray") == 0  # all done: no pool work
    assert (tmp_path / "ray.jsonl").read_text() == before


def test_the_input_is_numbered_in_order_and_cut_into_blocks_for_every_actor(job):
    source, total = ray_jobs.with_index(ray_jobs.read_dataset(job["root"] / "train.jsonl"), {0, 39},
                                        block_rows=8)
    assert total == N_TRAIN and source.dataset.materialize().num_blocks() == 5
    rows = source.dataset.take_all()
    assert [r[ray_jobs.INDEX] for r in rows] == list(range(1, N_TRAIN - 1))
    assert [json.loads(r[ray_jobs.LINE])["id"] for r in rows[:3]] == ["s5-1", "s5-2", "s5-3"]
    assert rows[3][ray_jobs.LINE_NUMBER] == 6  # the blank line after the third counts


def test_an_actor_that_dies_is_retried_and_every_id_comes_once(job, tmp_path):
    reference = tmp_path / "ref.safetensors"
    model = load_model(job["model"], dtype="float32")
    Valuator(model, progress=False).reference(read_samples(job["root"] / "valid.jsonl")).save(reference)
    job["flag"].touch()
    assert score(job, tmp_path / "out.jsonl", "--valid", str(reference), "--ray", "--actors", "2") == 0
    assert not job["flag"].exists()  # an actor crashed on it
    records = read_jsonl(tmp_path / "out.jsonl") + read_jsonl(tmp_path / "out.errors.jsonl")
    assert sorted(r["id"] for r in records) == sorted(s["id"] for s in job["train"])


def test_parquet_in_and_out_with_fields_self_values(job, tmp_path, capsys):
    rows = [{"name": s["id"], "input_ids": s["input_ids"], "loss_mask": s["loss_mask"], "group": i % 3}
            for i, s in enumerate(job["train"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    args = ["score", "--model", job["model"], "--dtype", "float32", "--train",
            str(tmp_path / "train.parquet"), "--id-field", "name", "--mode", "self", "--checkpoint", "16"]
    assert main([*args, "--out", str(tmp_path / "local.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "folder"), "--ray", "--out-format", "parquet"]) == 0
    table = pq.read_table(tmp_path / "folder" / "part-00000.parquet").to_pylist()
    check_same(read_jsonl(tmp_path / "local.jsonl"), table)
    capsys.readouterr()
    args[args.index("name")] = "missing"
    assert main([*args, "--out", str(tmp_path / "x.jsonl"), "--ray"]) == 2
    assert "has no column ['missing']" in capsys.readouterr().err


def test_a_covariance_built_on_the_pool_equals_the_local_one(job, tmp_path):
    samples = read_samples(job["root"] / "valid.jsonl")
    local = Valuator(load_model(job["model"], dtype="float64"), progress=False).covariance(samples)
    out = tmp_path / "c.safetensors"
    assert main(["covariance", "--model", job["model"], "--dtype", "float64", "--train",
                 str(job["root"] / "valid.jsonl"), "--out", str(out), "--ray", "--actors", "2"]) == 0
    built = Covariance.load(out)
    assert built.tokens == local.tokens
    torch.testing.assert_close(built.moment_sum, local.moment_sum, rtol=1e-12, atol=1e-12)


def test_an_index_built_on_ray_equals_the_local_build(job, tmp_path, capsys):
    """Two parts built as Ray tasks and merged: the same ids, failed rows and values as one
    local build; the parts are removed; a second run without --overwrite is refused."""
    build = ["index", "build", "--model", job["model"], "--dtype", "float64", "--train",
             str(job["root"] / "train.jsonl"), "--sketch-rows", "0", "--storage", "float32"]
    assert main([*build, "--out", str(tmp_path / "local")]) == 0
    assert main([*build, "--out", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 0
    assert not (tmp_path / "ray.parts").exists()
    model = load_model(job["model"], dtype="float64")
    valid = read_samples(job["root"] / "valid.jsonl")
    local, distributed = (Index.open(tmp_path / name, model, progress=False) for name in ("local", "ray"))
    assert distributed.ids() == local.ids() and len(local.ids()) == N_TRAIN - 1
    assert len(distributed.manifest["failed"]) == len(local.manifest["failed"]) == 1
    np.testing.assert_allclose(distributed.values(valid).values, local.values(valid).values, rtol=1e-6)
    capsys.readouterr()
    assert main([*build, "--out", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_a_preconditioned_reference_built_on_the_pool_equals_the_local_one(job):
    samples = read_samples(job["root"] / "valid.jsonl")
    config = ValuationConfig(precondition="input")
    model = load_model(job["model"], dtype="float64")
    local = Valuator(model, config=config, progress=False).reference(samples)
    built, skipped = ray_jobs.build_reference(ray_jobs.read_dataset(job["root"] / "valid.jsonl"),
                                              model=job["model"], config=config, actors=2,
                                              model_options={"dtype": "float64"})
    assert skipped == 0 and built.covariance == local.covariance == "valid"
    assert (built.count, built.tokens) == (local.count, local.tokens)
    torch.testing.assert_close(built.gradient_sum, local.gradient_sum, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(built.moment_sum, local.moment_sum, rtol=1e-12, atol=1e-12)


def test_an_unreachable_cluster_is_one_error_line(job, tmp_path):
    run = subprocess.run([sys.executable, "-m", "forvalue.bindings.cli", "score", "--model", job["model"],
                          "--train", str(job["root"] / "train.jsonl"), "--mode", "self",
                          "--out", str(tmp_path / "o.jsonl"), "--ray", "--ray-address", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        run.stderr.strip().splitlines()[-1]] and "cannot reach the Ray cluster at 127.0.0.1:1" in run.stderr


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ValueError, match=r"pip install 'forvalue\[ray\]'"):
        ray_jobs.import_ray()
