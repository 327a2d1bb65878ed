"""Comparing result JSONL files of batch jobs."""

import json

import numpy as np


def assert_same_records(path, expected_path) -> None:
    """Same ids in the same order, once each; values equal to floating-point rounding (which
    samples share a forward step changes the order of sums, not the value)."""
    got = [json.loads(x) for x in path.read_text().splitlines()]
    expected = [json.loads(x) for x in expected_path.read_text().splitlines()]
    assert [(r["id"], r["index"]) for r in got] == [(r["id"], r["index"]) for r in expected]
    for a, b in zip(got, expected, strict=True):
        key = "values" if "values" in b else "value"
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9)
