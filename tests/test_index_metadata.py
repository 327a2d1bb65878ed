"""The index keeps each sample's "meta"; select, values and query take a filter on it (``where``,
``--where KEY=VALUE``) and then give exactly the unfiltered answers restricted to the samples it
accepts; the filter survives compaction and merging; mistakes are refused by name."""

import json

import numpy as np
import pytest
import torch

from forvalue.bindings.cli import main
from forvalue.engine import Index, ValuationConfig, load_model
from forvalue.engine.index.metadata import parse_where

from tiny_models import random_samples, tiny_model

CONFIG = ValuationConfig(normalize="cosine", precondition="input", batch_tokens=48)


def tagged(samples, offset=0):
    return [dict(s, meta={"group": "ab"[(i + offset) % 2], "n": (i + offset) % 3})
            for i, s in enumerate(samples)]


@pytest.fixture(scope="module")
def setup():
    model = load_model(tiny_model("untied", seed=101), dtype=torch.float64)
    return model, tagged(random_samples(12, seed=102)), random_samples(3, seed=103)


def build(model, train, folder, **options):
    return Index.build(train, folder, model=model, config=CONFIG, sketch_rows=0, storage="float32",
                       progress=False, **options)


def test_a_filter_gives_the_unfiltered_values_of_the_samples_it_accepts(setup, tmp_path):
    model, train, valid = setup
    index = build(model, train, tmp_path / "index", shard_samples=5)
    every = index.values(valid)
    where = {"group": ["a"], "n": [0, 2]}
    accepted = [s["id"] for s in train if s["meta"]["group"] == "a" and s["meta"]["n"] in (0, 2)]
    found = index.values(valid, where=where)
    assert found.ids == accepted and len(accepted) == 4
    by_id = dict(zip(every.ids, every.values[:, 0], strict=True))
    np.testing.assert_allclose(found.values[:, 0], [by_id[i] for i in accepted], rtol=1e-12)
    chosen = index.select(valid, 0.5, where=where)
    best = sorted(accepted, key=lambda i: -by_id[i])[:2]
    assert chosen == [i for i in accepted if i in best]

    answers = index.query(valid[:2], top=2, where={"group": "b"})
    unfiltered = index.query(valid[:2], top=12, exact=True)
    for answer, full in zip(answers, unfiltered, strict=True):
        b_side = [m for m in full["most"] if m["id"] in {s["id"] for s in train if s["meta"]["group"] == "b"}]
        assert [m["id"] for m in answer["most"]] == [m["id"] for m in b_side[:2]]
        assert [m["value"] for m in answer["most"]] == pytest.approx([m["value"] for m in b_side[:2]])


def test_the_metadata_survives_compaction_and_merging(setup, tmp_path):
    model, train, valid = setup
    index = build(model, train, tmp_path / "index", shard_samples=5)
    index.delete([train[0]["id"]])
    index.compact()
    reopened = Index.open(index.folder, model, CONFIG, progress=False)
    expected = [s["id"] for s in train[1:] if s["meta"]["group"] == "a"]
    assert reopened.values(valid, where={"group": "a"}).ids == expected
    parts = [build(model, train, tmp_path / f"part{i}", shard=(i, 2)) for i in range(2)]
    merged = Index.merge([p.folder for p in parts], tmp_path / "merged")
    merged = Index.open(merged.folder, model, CONFIG, progress=False)
    assert merged.values(valid, where={"n": "1"}).ids == [s["id"] for s in train if s["meta"]["n"] == 1]


def test_filter_mistakes_are_refused_by_name(setup, tmp_path):
    model, train, valid = setup
    index = build(model, train, tmp_path / "index")
    with pytest.raises(ValueError, match="no stored sample has the metadata asked for"):
        index.values(valid, where={"group": "c"})
    with pytest.raises(ValueError, match="drop the shortlist"):
        index.select(valid, 0.5, shortlist=2, where={"group": "a"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_where(["group"])
    assert parse_where(["group=a", "group=b", "n=1"]) == {"group": {"a", "b"}, "n": {"1"}}
    plain = build(model, random_samples(4, seed=104), tmp_path / "plain")
    with pytest.raises(ValueError, match="group in"):
        plain.values(valid, where={"group": "a"})


def test_the_command_line_filters(setup, tmp_path, capsys):
    model, train, valid = setup
    model.causal_lm.save_pretrained(tmp_path / "model")
    for name, rows in (("train", train), ("valid", valid)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = ["--model", str(tmp_path / "model"), "--dtype", "float64"]
    assert main(["index", "build", "--train", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "idx"),
                 "--sketch-rows", "0", *options]) == 0
    out = tmp_path / "chosen.jsonl"
    assert main(["index", "select", str(tmp_path / "idx"), "--valid", str(tmp_path / "valid.jsonl"),
                 "--ratio", "0.5", "--where", "group=b", "--out", str(out), *options]) == 0
    chosen = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(chosen) == 3 and all(s["meta"]["group"] == "b" for s in chosen)
    capsys.readouterr()
    assert main(["index", "query", str(tmp_path / "idx"), "--samples", str(tmp_path / "valid.jsonl"),
                 "--where", "group", "--out", str(tmp_path / "q.jsonl"), *options]) == 2
    assert "--where takes KEY=VALUE" in capsys.readouterr().err


def test_meta_too_large_for_a_shard_header_is_refused(monkeypatch):
    from forvalue.engine.index import metadata

    monkeypatch.setattr(metadata, "MAX_HEADER_TEXT", 100)
    with pytest.raises(ValueError, match="store fewer samples per shard"):
        metadata.encode_metadata([{"text": "x" * 200}])
    assert metadata.encode_metadata([{}, {}]) is None


def test_live_shards_take_a_filter_as_given_and_corrupt_metadata_is_named(setup, tmp_path):
    from forvalue.engine.index.metadata import decode_metadata
    from forvalue.engine.index.store import IndexMismatch, Shard

    model, train, _ = setup
    index = build(model, train, tmp_path / "index", shard_samples=5)
    positions = [(number, p) for number, _, live in index.live_shards({"n": [1]}) for p in live]
    assert [index.shard(number).ids[p] for number, p in positions] == [
        s["id"] for s in train if s["meta"]["n"] == 1]
    shard = Shard(index.shard(0).path, index.manifest["shards"][0])  # opened anew: nothing decoded yet
    shard._meta_text = "{}"
    with pytest.raises(IndexMismatch, match="corrupt metadata"):
        _ = shard.meta  # decoded on first use
    with pytest.raises(ValueError, match="lists 1 samples, not 2"):
        decode_metadata('[{}]', 2)
