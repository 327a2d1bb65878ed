"""Batch jobs: resume after a kill, shards merged equal one job, top-k, select."""

import json

import numpy as np
import pytest
import torch

from forvalue.bindings.jobs.batch import run_score, select_top
from forvalue.bindings.jobs.shards import JobFiles, Shard, merge_shards
from forvalue.engine import Valuator, load_model
from forvalue.engine.inputs.readers import read_samples

from jsonl_records import assert_same_records
from tiny_models import random_samples, tiny_model


@pytest.fixture(scope="module")
def valuator():
    return Valuator(load_model(tiny_model("untied", seed=50), dtype=torch.float64), progress=False)


@pytest.fixture
def data(tmp_path):
    train = random_samples(11, seed=51)
    train[4] = {"id": "bad", "input_ids": [1, 2], "loss_mask": [1, 0]}  # nothing to value
    valid = random_samples(3, seed=52)
    for name, rows in (("train", train), ("valid", valid)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_samples(tmp_path / "train.jsonl"), str(tmp_path / "valid.jsonl")


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["reference", "pairwise", "self"])
def test_resume_after_kill_gives_the_same_files(valuator, data, tmp_path, mode):
    train, valid = data
    clean = JobFiles(tmp_path / f"clean-{mode}.jsonl")
    run_score(valuator, train, valid, clean, mode=mode, shard=Shard(0, 1), checkpoint=3, top_k=None)

    killed = JobFiles(tmp_path / f"killed-{mode}.jsonl")
    text = clean.out.read_text()
    cut = text.index("\n", len(text) // 2) + 10  # two whole checkpoints and a torn line
    killed.out.write_text(text[:cut])
    summary = run_score(valuator, train, valid, killed, mode=mode, shard=Shard(0, 1), checkpoint=3,
                        top_k=None)
    assert_same_records(killed.out, clean.out)
    assert lines(killed.errors) == lines(clean.errors)
    assert [e["id"] for e in lines(killed.errors)] == ["bad"]
    assert "train.jsonl line 5" in lines(killed.errors)[0]["error"]
    assert summary["scored"] == 10 and summary["errors"] == 1


def test_shards_merge_into_the_whole_job(valuator, data, tmp_path):
    train, valid = data
    whole = JobFiles(tmp_path / "whole.jsonl")
    run_score(valuator, train, valid, whole, mode="pairwise", shard=Shard(0, 1), checkpoint=4, top_k=2)
    parts = []
    for i in range(3):
        files = JobFiles(tmp_path / f"part{i}.jsonl")
        run_score(valuator, train, valid, files, mode="pairwise", shard=Shard(i, 3), checkpoint=4,
                  top_k=None)
        parts.append(str(files.out))
    merge_shards(parts, tmp_path / "merged.jsonl")
    assert_same_records(tmp_path / "merged.jsonl", whole.out)
    np.testing.assert_allclose(np.load(tmp_path / "merged.npy"), np.load(whole.matrix), rtol=1e-9)
    with pytest.raises(ValueError, match="more than one shard"):
        merge_shards(parts + parts[:1], tmp_path / "twice.jsonl")

    matrix = np.load(whole.matrix)
    ids = [r["id"] for r in lines(whole.out)]
    for j, entry in enumerate(lines(whole.topk)):
        order = np.argsort(-matrix[:, j])
        assert [m["id"] for m in entry["most"]] == [ids[i] for i in order[:2]]
        assert [m["id"] for m in entry["least"]] == [ids[i] for i in order[::-1][:2]]


def test_select_writes_the_top_samples_as_given(data, tmp_path):
    train, _ = data
    records = [{"index": i, "value": float(v)} for i, v in enumerate([3, 1, 4, 1, float("nan"), 9])]
    summary = select_top(train, records, 0.4, tmp_path / "sel.jsonl")
    assert summary["selected"] == 2 and summary["valued"] == 5
    assert lines(tmp_path / "sel.jsonl") == [train[2], train[5]]
    with pytest.raises(ValueError, match="ratio"):
        select_top(train, records, 1.5, tmp_path / "x.jsonl")


def test_bad_options_are_clear(valuator, data, tmp_path):
    train, valid = data
    files = JobFiles(tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="I/N"):
        Shard.parse("3")
    with pytest.raises(ValueError, match="needs --valid"):
        run_score(valuator, train, None, files, mode="reference", shard=Shard(0, 1), checkpoint=2, top_k=None)
    with pytest.raises(ValueError, match="--top-k needs"):
        run_score(valuator, train, valid, files, mode="reference", shard=Shard(0, 1), checkpoint=2, top_k=3)
