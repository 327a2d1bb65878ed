"""How ``forvalue eval`` measures a method: wall and CPU seconds, and peak memory (resident,
and the GPU's when one is in use)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class Measurement:
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time, all threads: robust to other load on the machine
    peak_mb: float = 0.0
    extra_mb: float = 0.0  # peak above the resident memory when the method started
    gpu_peak_mb: float | None = None  # torch's peak CUDA allocation, when CUDA is in use


def _rss_mb(field_name: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so that each method gets its own."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


@contextmanager
def measure() -> Any:
    """Wall seconds and peak RSS (MB) of the block. Without a resettable peak (not Linux),
    the peak is the process's peak so far: an upper bound."""
    result = Measurement()
    if _reset_peak():
        start_mb = _rss_mb("VmRSS")
        read_peak = lambda: _rss_mb("VmHWM")  # noqa: E731
    else:
        import resource

        start_mb = math.nan
        read_peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    cuda = _cuda_in_use()
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        if cuda is not None:
            cuda.synchronize()
            result.gpu_peak_mb = cuda.max_memory_allocated() / 2**20
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = time.process_time() - start_cpu
        result.peak_mb = read_peak()
        result.extra_mb = result.peak_mb - start_mb


def _cuda_in_use() -> Any:
    import torch

    return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
