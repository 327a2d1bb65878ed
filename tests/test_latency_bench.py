"""bench/perf/latency.py --quick: every path measured side by side, finite numbers, a report."""

import math

from forvalue.bench.perf.latency import main


def test_quick_run_reports_every_path(tmp_path):
    result = main(["--quick", "--out", str(tmp_path / "latency")])
    stats = result["stats"]
    assert set(stats) == {"forward", "forward+vocab", "valuator", "async_engine", "grpc_call", "grpc_stream"}
    for name, path in stats.items():
        assert all(math.isfinite(path[k]) and path[k] > 0 for k in ("p50_ms", "p90_ms", "mean_ms")), name
    assert (tmp_path / "latency.md").stat().st_size > 0
