"""`forvalue score/select/merge` end to end, including a SIGKILL in the middle of a job."""

import json
import os
import signal
import sys

import numpy as np
import pytest

from forvalue.bindings.cli import main
from forvalue.engine.valuation.ranking import round_robin

from child_process import Child
from jsonl_records import assert_same_records
from tiny_models import random_samples, tiny_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model("untied", seed=60).save_pretrained(root / "model")
    for name, rows in (("train", random_samples(300, seed=61)), ("valid", random_samples(4, seed=62))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def score_args(root, out, *extra):
    return ["score", "--model", str(root / "model"), "--dtype", "float64", "--train",
            str(root / "train.jsonl"), "--valid", str(root / "valid.jsonl"), "--out", str(out), *extra]


def test_sigkill_then_resume_gives_the_clean_output(workdir):
    clean = workdir / "clean.jsonl"
    assert main(score_args(workdir, clean, "--checkpoint", "7")) == 0
    killed = workdir / "killed.jsonl"
    command = [sys.executable, "-m", "forvalue.bindings.cli",
               *score_args(workdir, killed, "--checkpoint", "1")]
    with Child(command) as job:
        job.wait_for(lambda: killed.exists() and killed.read_text().count("\n") >= 20, "20 values")
        os.kill(job.process.pid, signal.SIGKILL)
        job.process.wait()
    done_before = killed.read_text().count("\n")
    assert 20 <= done_before < 300, "the kill must land in the middle of the job"
    assert main(score_args(workdir, killed, "--checkpoint", "7")) == 0
    assert_same_records(killed, clean)


def test_shards_merge_and_select(workdir, capsys):
    parts = []
    for i in range(2):
        out = workdir / f"shard{i}.jsonl"
        assert main(score_args(workdir, out, "--shard", f"{i}/2")) == 0
        parts.append(str(out))
    assert main(["merge", *parts, "--out", str(workdir / "merged.jsonl")]) == 0
    assert main(score_args(workdir, workdir / "whole.jsonl")) == 0
    assert_same_records(workdir / "merged.jsonl", workdir / "whole.jsonl")

    selected = workdir / "selected.jsonl"
    assert main(["select", "--model", str(workdir / "model"), "--dtype", "float64", "--train",
                 str(workdir / "train.jsonl"), "--valid", str(workdir / "valid.jsonl"),
                 "--ratio", "0.1", "--out", str(selected),
                 "--precondition", "none", "--normalize", "none", "--skip-depth", "none"]) == 0  # score's
    rows = [json.loads(x) for x in selected.read_text().splitlines()]
    whole = (workdir / "whole.jsonl").read_text().splitlines()
    values = {r["id"]: r["value"] for r in map(json.loads, whole)}
    assert len(rows) == 30
    assert min(values[r["id"]] for r in rows) >= sorted(values.values())[-30]

    # Round robin: each of the 4 validation samples takes its best remaining sample in turn.
    assert main(score_args(workdir, workdir / "pairs.jsonl", "--mode", "pairwise")) == 0
    pairs = [json.loads(x) for x in (workdir / "pairs.jsonl").read_text().splitlines()]
    expected = sorted(round_robin(np.array([r["values"] for r in pairs]), 30))
    assert main(["select", "--model", str(workdir / "model"), "--dtype", "float64", "--train",
                 str(workdir / "train.jsonl"), "--valid", str(workdir / "valid.jsonl"), "--ratio", "0.1",
                 "--out", str(workdir / "spread.jsonl"), "--strategy", "round-robin",
                 "--precondition", "none", "--normalize", "none", "--skip-depth", "none"]) == 0
    spread = [json.loads(x)["id"] for x in (workdir / "spread.jsonl").read_text().splitlines()]
    assert spread == [pairs[i]["id"] for i in expected]
    assert set(spread) != {r["id"] for r in rows}  # not the same as the top by mean value


def test_user_mistakes_are_one_line(workdir, capsys):
    assert main(score_args(workdir, workdir / "x.jsonl", "--shard", "5/2")) == 2
    assert "forvalue: error: --shard 5/2" in capsys.readouterr().err
    assert main(score_args(workdir, workdir / "y.jsonl", "--mode", "reference", "--top-k", "3")) == 2
    assert "--top-k needs --mode pairwise" in capsys.readouterr().err
    select = ["select", "--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl"),
              "--ratio", "0.1", "--out", str(workdir / "z.jsonl"), "--strategy", "round-robin"]
    assert main([*select, "--valid", str(workdir / "valid.jsonl"), "--ray"]) == 2
    assert "--strategy round-robin runs without --ray" in capsys.readouterr().err
    assert main([*select, "--valid", str(workdir / "ref.safetensors")]) == 2
    assert "a saved Reference only serves --mode reference" in capsys.readouterr().err
