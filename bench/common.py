"""What every benchmark and evaluation report states beside its numbers: the machine, the load
average around the run, and latency percentiles."""

from __future__ import annotations

import os
import platform

import numpy as np
import torch


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "n": len(values)}


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
