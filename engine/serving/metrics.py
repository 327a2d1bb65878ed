"""The serving engine's statistics, and their Prometheus text exposition."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..outputs import EngineStats, ScoreResult

# Latency percentiles and tokens/s are taken over this many recent results / seconds.
LATENCY_WINDOW = 2048
THROUGHPUT_WINDOW_S = 30.0
QUANTILES = (0.5, 0.9, 0.99)
# Histogram bounds (cumulative since start, so a scraper can aggregate replicas and windows).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_TOKEN_BUCKETS = tuple(float(2 ** k) for k in range(4, 17))
OUTCOMES_OK = ("admitted", "scored")  # every other outcome is an error of that kind


class Histogram:
    """Cumulative counts per upper bound, the sum and the count, as Prometheus histograms are."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> tuple[tuple[float, ...], list[int], float, int]:
        return self.bounds, list(self.counts), self.sum, self.count


def prometheus_text(stats: EngineStats) -> str:
    """EngineStats in Prometheus' text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP forvalue_{name} {help_text}", f"# TYPE forvalue_{name} {kind}"])
        lines.extend(f"forvalue_{name}{labels} {value:.9g}" for labels, value in samples)

    metric("waiting_requests", "gauge", "Requests in the waiting queue.", [("", stats.waiting)])
    metric("running_requests", "gauge", "Requests in the step in flight or between chunks.",
           [("", stats.running)])
    metric("references", "gauge", "Resident references.", [("", stats.references)])
    metric("steps_total", "counter", "Forward steps run.", [("", stats.steps)])
    metric("tokens_total", "counter", "Tokens forwarded.", [("", stats.tokens_total)])
    metric("tokens_per_second", "gauge", f"Tokens forwarded per second over the last "
           f"{THROUGHPUT_WINDOW_S:.0f} s.", [("", stats.tokens_per_second)])
    metric("requests_total", "counter", "Requests by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in sorted(stats.requests.items())])
    metric("errors_total", "counter", "Requests answered with an error, by kind.",
           [(f'{{kind="{k}"}}', v) for k, v in sorted(stats.requests.items()) if k not in OUTCOMES_OK])
    for phase, quantiles in stats.latency.items():
        metric(f"{phase}_latency_seconds", "summary", f"{phase.capitalize()} latency of recent "
               f"results.", [(f'{{quantile="{q}"}}', v) for q, v in quantiles.items()])
    for name, (bounds, counts, total, count) in stats.histograms.items():
        buckets = [(f'_bucket{{le="{b:g}"}}', c) for b, c in zip(bounds, counts, strict=True)]
        metric(name, "histogram", HISTOGRAM_HELP[name],
               [*buckets, ('_bucket{le="+Inf"}', count), ("_sum", total), ("_count", count)])
    return "\n".join(lines) + "\n"


HISTOGRAM_HELP = {"request_queue_seconds": "Seconds scored requests waited in the queue.",
                  "request_compute_seconds": "Seconds from a scored request's first step to its value.",
                  "request_total_seconds": "Seconds from admission to value of scored requests.",
                  "step_tokens": "Tokens per forward step."}


class EngineMetrics:
    """Counters, recent step throughput, latency windows and histograms of a serving engine."""

    def __init__(self) -> None:
        self.histograms = {name: Histogram(STEP_TOKEN_BUCKETS if name == "step_tokens" else LATENCY_BUCKETS)
                           for name in HISTOGRAM_HELP}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.tokens_total = 0
        self._recent_steps: deque[tuple[float, int]] = deque()
        self._latency: dict[str, deque[float]] = {phase: deque(maxlen=LATENCY_WINDOW)
                                                  for phase in ("queue", "compute", "total")}

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def step(self, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        self.steps += 1
        self.tokens_total += tokens
        self.histograms["step_tokens"].observe(tokens)
        self._recent_steps.append((now, tokens))
        while self._recent_steps and self._recent_steps[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent_steps.popleft()

    def result(self, outcome: str, result: ScoreResult) -> None:
        self.count(outcome)
        if outcome == "scored":
            self._latency["queue"].append(result.queue_seconds)
            self._latency["compute"].append(result.compute_seconds)
            self._latency["total"].append(result.queue_seconds + result.compute_seconds)
            for phase in ("queue", "compute", "total"):
                self.histograms[f"request_{phase}_seconds"].observe(self._latency[phase][-1])

    def snapshot(self, waiting: int, running: int, references: int) -> EngineStats:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent_steps if t >= now - THROUGHPUT_WINDOW_S]
        span = now - recent[0][0] if len(recent) > 1 else 0.0
        rate = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        latency = {phase: {q: float(np.quantile(list(values), q)) for q in QUANTILES}
                   for phase, values in self._latency.items() if values}
        return EngineStats(waiting, running, references, self.steps, self.tokens_total, rate,
                           dict(self.counts), latency,
                           {name: h.snapshot() for name, h in self.histograms.items()})
