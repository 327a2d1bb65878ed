"""What every benchmark and evaluation report states beside its numbers: the machine, the load
average around the run, and latency percentiles."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def check_methods(names: Sequence[str] | None, known: Sequence[str], what: str) -> None:
    """Refuse a method name that is not among ``known`` (one line, the choices named)."""
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise SystemExit(f"forvalue eval: unknown {what} method(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(known)}")


def results_writer(path: Path, header: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function that writes ``header``, what it is given, the seconds since this call, the
    machine and the load average around the run to ``path`` (a long run calls it after every
    part, so that nothing is lost when it is cut), and returns what it wrote."""
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(found: dict[str, Any]) -> dict[str, Any]:
        result = {**header, **found, "seconds": time.perf_counter() - start, "machine": machine(),
                  "threads": torch.get_num_threads(), "load_average": [load_before, os.getloadavg()[0]]}
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.replace(path)  # a run cut while writing leaves the last whole file
        return result

    return write
