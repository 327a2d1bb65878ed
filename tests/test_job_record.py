"""A rerun into the same --out resumes the same job and refuses another one (bindings/jobs/job_record.py):
another validation set, option, model, adapter or training file under the same name is refused in
one line; --overwrite starts over; shards of different jobs are not merged."""

import json
import shutil

import pytest

from forvalue.bindings.cli import main
from forvalue.bindings.jobs.job_record import JobIdentity, claim_output, read_record

from jsonl_records import assert_same_records
from tiny_models import random_samples, tiny_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    tiny_model("untied", seed=70).save_pretrained(root / "model")
    tiny_model("untied", seed=71).save_pretrained(root / "other-model")
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    for name, rows in (("train", random_samples(12, seed=72)), ("valid-a", random_samples(3, seed=73)),
                       ("valid-b", random_samples(3, seed=74))):
        write(root / f"{name}.jsonl", rows)
    return root


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def score(workdir, out, *extra, valid="valid-a", train="train.jsonl", model="model"):
    return main(["score", "--model", str(workdir / model), "--dtype", "float64", "--train",
                 str(workdir / train), "--valid", str(workdir / f"{valid}.jsonl"), "--out", str(out), *extra])


def values(path):
    return [json.loads(line)["value"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("change", "named"), [
    ({"valid": "valid-b"}, "valid: recorded '"),
    ({"extra": ("--normalize", "cosine")}, "options.normalize: recorded 'none', now 'cosine'"),
    ({"model": "other-model"}, "model.name"),
    ({"extra": ("--adapter", "ADAPTER")}, "adapter.name: recorded none, now"),
    ({"extra": ("--loss-on", "all")}, "options.loss_on"),
])
def test_another_job_into_the_same_out_is_refused_in_one_line(workdir, tmp_path, capsys, change, named):
    out = tmp_path / "values.jsonl"
    assert score(workdir, out) == 0
    before = out.read_text()
    extra = [str(workdir / "adapter") if arg == "ADAPTER" else arg for arg in change.get("extra", ())]
    capsys.readouterr()
    assert score(workdir, out, *extra, valid=change.get("valid", "valid-a"),
                 model=change.get("model", "model")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("forvalue: error:") and "Traceback" not in error
    assert named in error and "holds values of another job" in error and "--overwrite" in error
    assert out.read_text() == before  # nothing mixed in


def test_the_first_targets_values_never_come_back_for_a_second_target(workdir, tmp_path, capsys):
    """The reported case: select for target A, then for target B into the same --out."""
    select = ["select", "--model", str(workdir / "model"), "--dtype", "float64", "--train",
              str(workdir / "train.jsonl"), "--ratio", "0.25", "--out", str(tmp_path / "sel.jsonl")]
    assert main([*select, "--valid", str(workdir / "valid-a.jsonl")]) == 0
    assert main([*select, "--valid", str(workdir / "valid-b.jsonl")]) == 2
    assert "valid-b.jsonl" in capsys.readouterr().err
    assert main([*select, "--valid", str(workdir / "valid-b.jsonl"), "--overwrite"]) == 0
    assert main([*select, "--valid", str(workdir / "valid-b.jsonl"), "--out",
                 str(tmp_path / "fresh.jsonl")]) == 0
    assert_same_records(tmp_path / "sel.values.jsonl", tmp_path / "fresh.values.jsonl")
    assert (tmp_path / "sel.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()


def test_a_training_file_rewritten_under_the_same_name_is_refused_a_moved_one_resumes(workdir, tmp_path,
                                                                                     capsys):
    train = tmp_path / "train.jsonl"
    shutil.copy(workdir / "train.jsonl", train)
    out = tmp_path / "values.jsonl"
    assert score(workdir, out, train=train) == 0
    moved = tmp_path / "moved.jsonl"
    train.rename(moved)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:5]) + "\n")  # as if killed after five values
    assert score(workdir, out, train=moved) == 0  # same bytes elsewhere: the same job, resumed
    assert len(out.read_text().splitlines()) == 12
    write(train, random_samples(12, seed=99))
    assert score(workdir, out, train=train) == 2
    assert "train: recorded '" in capsys.readouterr().err


def test_overwrite_starts_over_and_an_output_without_a_record_is_refused(workdir, tmp_path, capsys):
    out, fresh = tmp_path / "values.jsonl", tmp_path / "fresh.jsonl"
    assert score(workdir, out) == 0
    assert score(workdir, out, "--normalize", "cosine", "--overwrite") == 0
    assert score(workdir, fresh, "--normalize", "cosine") == 0
    assert_same_records(out, fresh)
    (tmp_path / "values.job.json").unlink()
    assert score(workdir, out, "--normalize", "cosine") == 2
    assert "written without a job record" in capsys.readouterr().err
    (tmp_path / "values.job.json").write_text("{not json")
    assert score(workdir, out, "--normalize", "cosine") == 2
    assert "is not a readable job record" in capsys.readouterr().err


def test_options_that_only_batch_differently_resume(workdir, tmp_path):
    out = tmp_path / "values.jsonl"
    assert score(workdir, out, "--batch-tokens", "64") == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n")
    assert score(workdir, out, "--batch-tokens", "512", "--checkpoint", "5") == 0
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == list(range(12))


def test_shards_of_different_jobs_are_not_merged(workdir, tmp_path, capsys):
    assert score(workdir, tmp_path / "a.jsonl", "--shard", "0/2") == 0
    assert score(workdir, tmp_path / "b.jsonl", "--shard", "1/2", valid="valid-b") == 0  # its own out
    assert main(["merge", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out",
                 str(tmp_path / "m.jsonl")]) == 2
    assert "shards of different jobs" in capsys.readouterr().err
    assert score(workdir, tmp_path / "c.jsonl", "--shard", "1/2") == 0
    assert main(["merge", str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl"), "--out",
                 str(tmp_path / "m.jsonl")]) == 0
    merged = read_record(tmp_path / "m.job.json")
    assert merged.compared["shard"] == "0/2+1/2"
    assert merged.compared["valid"] == read_record(tmp_path / "a.job.json").compared["valid"]
    for name in ("a", "c"):  # shards without records: merged with a warning, no stale record left
        shutil.copy(tmp_path / f"{name}.jsonl", tmp_path / f"bare-{name}.jsonl")
    assert main(["merge", str(tmp_path / "bare-a.jsonl"), str(tmp_path / "bare-c.jsonl"), "--out",
                 str(tmp_path / "m.jsonl")]) == 0
    assert "no job records" in capsys.readouterr().err
    assert not (tmp_path / "m.job.json").exists()


def test_a_ray_job_is_refused_before_ray_starts(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "values.jsonl"
    assert score(workdir, out) == 0
    monkeypatch.setattr("forvalue.bindings.cli.ray_job.init_ray", lambda address: pytest.fail("Ray started"))
    assert score(workdir, out, "--ray", valid="valid-b") == 2
    assert "holds values of another job" in capsys.readouterr().err


def test_a_record_without_values_protects_nothing(tmp_path):
    out, record = tmp_path / "v.jsonl", tmp_path / "v.job.json"
    claim_output(record, (out,), JobIdentity({"a": 1}), overwrite=False)
    claim_output(record, (out,), JobIdentity({"a": 2}), overwrite=False)  # nothing written yet
    assert read_record(record).compared == {"a": 2}
    out.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="a: recorded 2, now 3"):
        claim_output(record, (out,), JobIdentity({"a": 3}), overwrite=False)
