"""Sample readers: JSONL (strict), parquet and saved datasets (extra columns go to meta)."""

import json

import datasets
import pytest

from forvalue.engine.inputs.readers import read_samples
from forvalue.engine.inputs.samples import SampleError

ROWS = [{"Question": "two plus two", "Answer": "four", "qid": 7, "clean_label": 1},
        {"Question": "the cat", "Answer": "sat", "qid": 8, "clean_label": 0}]
FIELDS = {"prompt": "Question", "response": "Answer", "id": "qid"}
EXPECTED = [{"prompt": "two plus two", "response": "four", "id": 7, "meta": {"clean_label": 1}},
            {"prompt": "the cat", "response": "sat", "id": 8, "meta": {"clean_label": 0}}]


def test_jsonl_with_field_mapping_keeps_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    samples = read_samples(path, fields=FIELDS)
    assert list(samples) == EXPECTED
    assert samples.where(1) == f"{path} line 2"


def test_parquet_and_saved_dataset(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(tmp_path / "train.parquet")
    assert list(read_samples(tmp_path / "train.parquet", fields=FIELDS)) == EXPECTED
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "saved")
    assert list(read_samples(tmp_path / "saved", fields=FIELDS, split="train")) == EXPECTED
    with pytest.raises(ValueError, match="choose one with split"):
        read_samples(tmp_path / "saved", fields=FIELDS)


def test_columns_named_like_sample_keys_need_no_mapping(tmp_path):
    datasets.Dataset.from_list([{"text": "hello there", "score": 0.5}]).to_parquet(tmp_path / "t.parquet")
    assert list(read_samples(tmp_path / "t.parquet")) == [{"text": "hello there", "meta": {"score": 0.5}}]


def test_mapping_errors(tmp_path):
    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(SampleError, match="no column 'Prompt'"):
        read_samples(tmp_path / "t.parquet", fields={"prompt": "Prompt", "response": "Answer"})
    with pytest.raises(ValueError, match="cannot map onto"):
        read_samples(tmp_path / "t.parquet", fields={"question": "Question"})
    with pytest.raises(FileNotFoundError):
        read_samples(tmp_path / "missing.jsonl")
