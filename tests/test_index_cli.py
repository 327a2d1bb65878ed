"""``forvalue index``: build, info, select (the same outputs as ``forvalue select``; with the
identity sketch, the same values and choice), query, delete, compact and merge from the command
line; mistakes end in one line."""

import json

import pytest

from forvalue.bindings.cli import main

from tiny_models import random_samples, tiny_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    tiny_model("untied", seed=92).save_pretrained(root / "model")
    for name, rows in (("train", random_samples(10, seed=93)), ("valid", random_samples(3, seed=94)),
                       ("more", [dict(s, id=f"more-{i}") for i, s in enumerate(random_samples(3, seed=95))])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(workdir, *args):
    return main([*args, "--model", str(workdir / "model"), "--dtype", "float64"])


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_index_select_gives_what_select_gives(workdir, tmp_path, capsys):
    index = tmp_path / "index"
    assert run(workdir, "index", "build", "--train", str(workdir / "train.jsonl"), "--out", str(index),
               "--sketch-rows", "0", "--storage", "float32", "--skip-depth", "0.5") == 0
    capsys.readouterr()
    assert main(["index", "info", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["samples"], info["labelling"]["skip_depth"], info["sketch"]["kind"]) == (10, 0.5, "identity")
    for strategy in ("top", "round-robin"):
        exact, fast = tmp_path / f"exact-{strategy}.jsonl", tmp_path / f"index-{strategy}.jsonl"
        assert run(workdir, "select", "--train", str(workdir / "train.jsonl"), "--valid",
                   str(workdir / "valid.jsonl"), "--ratio", "0.4", "--strategy", strategy,
                   "--out", str(exact), "--skip-depth", "0.5") == 0
        assert run(workdir, "index", "select", str(index), "--valid", str(workdir / "valid.jsonl"), "--ratio",
                   "0.4", "--strategy", strategy, "--out", str(fast)) == 0
        assert lines(fast) == lines(exact) and len(lines(fast)) == 4
    values = {r["id"]: r["value"] for r in lines(tmp_path / "index-top.values.jsonl")}
    expected = {r["id"]: r["value"] for r in lines(tmp_path / "exact-top.values.jsonl")}
    assert values == pytest.approx(expected, rel=1e-5)
    shortlisted = tmp_path / "shortlisted.jsonl"  # 2 x the budget of 4 valued exactly, 2 estimated
    assert run(workdir, "index", "select", str(index), "--valid", str(workdir / "valid.jsonl"), "--ratio",
               "0.4", "--shortlist", "2", "--out", str(shortlisted)) == 0
    records = lines(tmp_path / "shortlisted.values.jsonl")
    exact_records = [r for r in records if not r.get("estimated")]
    assert len(records) == 10 and len(exact_records) == 8
    assert {r["id"]: r["value"] for r in exact_records} == pytest.approx(
        {r["id"]: values[r["id"]] for r in exact_records}, rel=1e-5)
    best = sorted(exact_records, key=lambda r: -r["value"])[:4]
    assert [s["id"] for s in lines(shortlisted)] == [r["id"] for r in sorted(best, key=lambda r: r["index"])]


def test_query_delete_compact_append_and_merge(workdir, tmp_path, capsys):
    train, index = workdir / "train.jsonl", tmp_path / "index"
    for part in ("0/2", "1/2"):
        assert run(workdir, "index", "build", "--train", str(train), "--out", str(tmp_path / part[0]),
                   "--shard", part, "--sketch-rows", "64", "--max-tokens", "4") == 0
    assert main(["index", "merge", str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(index)]) == 0
    assert run(workdir, "index", "query", str(index), "--samples", str(workdir / "valid.jsonl"), "--top", "2",
               "--out", str(tmp_path / "query.jsonl")) == 0
    answers = lines(tmp_path / "query.jsonl")
    assert [a["id"] for a in answers] == ["s94-0", "s94-1", "s94-2"]
    assert all(len(a["most"]) == 2 and a["most"][0]["value"] >= a["most"][1]["value"] for a in answers)
    assert main(["index", "delete", str(index), "--ids", "s93-0", "s93-4"]) == 0
    assert main(["index", "compact", str(index)]) == 0
    assert run(workdir, "index", "append", str(index), "--train", str(workdir / "more.jsonl")) == 0
    capsys.readouterr()
    assert main(["index", "info", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["samples"], info["deleted"], len(info["sources"])) == (11, 0, 2)
    assert info["max_tokens"] == 4 and info["merged_samples"] > 0  # the appended samples merged alike


def test_mistakes_end_in_one_line(workdir, tmp_path, capsys):
    assert main(["index", "info", str(tmp_path)]) == 2
    assert "not a forvalue index (no index.json)" in capsys.readouterr().err
    index = tmp_path / "index"
    assert run(workdir, "index", "build", "--train", str(workdir / "train.jsonl"), "--out", str(index),
               "--sketch-rows", "16") == 0
    capsys.readouterr()
    assert run(workdir, "index", "build", "--train", str(workdir / "valid.jsonl"), "--out", str(index),
               "--sketch-rows", "16") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert run(workdir, "index", "select", str(index), "--valid", str(workdir / "valid.jsonl"),
               "--ratio", "2", "--out", str(tmp_path / "x.jsonl")) == 2
    assert "ratio" in capsys.readouterr().err
    assert run(workdir, "index", "select", str(index), "--valid", str(workdir / "valid.jsonl"),
               "--ratio", "0.5", "--shortlist", "-1", "--out", str(tmp_path / "x.jsonl")) == 2
    assert "--shortlist must be >= 0" in capsys.readouterr().err
    assert main(["index", "delete", str(index), "--ids", "nobody"]) == 2
    assert "not in the index" in capsys.readouterr().err
    for flag, value, message in (("--sketch-rows", "-1", "sketch_rows must be >= 0"),
                                 ("--max-tokens", "0", "max_tokens >= 1"),
                                 ("--shard-samples", "0", "shard_samples must be positive")):
        assert run(workdir, "index", "build", "--train", str(workdir / "train.jsonl"), "--out",
                   str(tmp_path / "other"), flag, value) == 2
        assert message in capsys.readouterr().err
