"""bench/gpu_check.sh --e2e --dry-run: the GPU end-to-end script runs on the CPU (tiny shapes)
and writes every section; a dry run never writes into bench/results/."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
MODEL_SECTIONS = ("qwen2.5-1.5b", "smollm2-135m", "llama-3-8b")
MODEL_NUMBERS = {"engine_tokens_per_s", "engine_samples_per_hour", "hf_logits_tokens_per_s",
                 "hf_headless_tokens_per_s", "vs_hf_logits", "vs_hf_headless", "gemm_tflops", "engine_mfu",
                 "hf_logits_mfu", "hf_headless_mfu", "saturation_samples_per_s", "arrival_rate_per_s",
                 "latency_p50_ms", "latency_p99_ms", "warmup_s"}
MODEL_KEYS = MODEL_NUMBERS | {"section", "shape", "device", "dtype", "attention", "why_not_packed", "samples",
                              "tokens", "labels", "padded_tokens", "latency_seconds", "latency_n", "seconds"}


def gpu_check(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out), *flags], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable})


@pytest.mark.slow
def test_the_e2e_dry_run_writes_every_section(tmp_path):
    done = gpu_check(tmp_path, "--e2e", "--dry-run")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for name in MODEL_SECTIONS:
        result = json.loads((tmp_path / f"e2e-{name}.json").read_text())
        assert MODEL_KEYS <= result.keys(), (name, result)
        assert all(math.isfinite(result[key]) and result[key] > 0 for key in MODEL_NUMBERS), result
        assert result["device"] == "cpu" and result["attention"] == "varlen"
    modes = json.loads((tmp_path / "e2e-attention-modes.json").read_text())
    assert modes["auto"] == "varlen" and set(modes["modes"]) == {"varlen", "flex", "buckets"}
    assert all(mode["tokens_per_s"] > 0 for mode in modes["modes"].values())
    meta = json.loads((tmp_path / "e2e-meta.json").read_text())
    assert meta["dry_run"] is True and meta["gemm_tflops"] > 0
    rows = [line for line in (tmp_path / "e2e.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(MODEL_SECTIONS) + 1  # the head, one line per section


def test_a_dry_run_never_writes_into_bench_results():
    target = REPO / "bench" / "results" / "dry-run-test"
    done = gpu_check(target, "--e2e", "--dry-run")
    assert done.returncode == 2 and "bench/results" in done.stderr
    assert not target.exists()


@pytest.mark.slow
def test_the_profile_dry_run_writes_its_tables(tmp_path):
    done = gpu_check(tmp_path, "--profile", "--dry-run")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "profile.json").read_text())
    assert result["tokens_per_s"] > 0 and 0 < result["single_p50_ms"] <= result["single_p99_ms"]
    assert result["flex"] == []  # compiled FlexAttention alone runs on CUDA only
    text = (tmp_path / "profile.txt").read_text()
    assert "# bulk:" in text and "# single:" in text and "aten::mm" in text
