"""Engine throughput and latency on the embedded model (CPU), against static batching.

Workload: a realistic length mix (log-normal, median 128, clipped to 16..1024 tokens; the
last two thirds of each sample labelled), valued against a reference (score mode).

1. tokens/s of the engine (packed continuous batching) against static batches of 8 in
   arrival order padded to their longest (the official code's way), both doing the same
   forward + reference-score kernels; target >= 1.5x;
2. valuation throughput of the engine against a plain hidden-state forward (no valuation)
   over the same tokens on length-sorted padded batches of 8; target >= 0.8;
3. latency p50/p99 of single samples arriving (Poisson, at half the engine's measured
   capacity) while a bulk job keeps the server busy: engine FCFS, engine with priority,
   and a static-batching server (batches of up to 8 in arrival order).

    FORVALUE_CACHE=/tmp/fvcache python -m forvalue.bench.perf.throughput --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from forvalue import kernels
from forvalue.engine import Reference, ValuationModel, Valuator, load_model
from forvalue.engine.core.runner import right_padded
from forvalue.engine.serving.async_engine import AsyncEngine

from ..common import load_average, machine, percentiles

STATIC_BATCH = 8
BULK_OUTSTANDING = 16  # requests a bulk client keeps in flight (a bounded client, not a flood)


# ------------------------------------------------------------------ workload


def make_samples(n: int, seed: int, vocab: int, prefix: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(128), 1.0, n), 16, 1024).astype(int)
    samples = []
    for i, length in enumerate(lengths):
        ids = rng.integers(0, vocab, length).tolist()
        prompt = length // 3
        samples.append({"id": f"{prefix}{i}", "input_ids": ids,
                        "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return samples


def num_tokens(samples: list[dict]) -> int:
    return sum(len(s["input_ids"]) for s in samples)


def padded_tokens(lengths: list[int]) -> int:
    """Tokens a forward computes on consecutive batches of 8 padded to their longest."""
    return sum(len(lengths[i:i + STATIC_BATCH]) * max(lengths[i:i + STATIC_BATCH])
               for i in range(0, len(lengths), STATIC_BATCH))


# ------------------------------------------------------------------ static batching


def static_batch_values(model: ValuationModel, batch: list[dict], mean: torch.Tensor) -> list[float]:
    """Forward a padded batch and score its label tokens (one kernel call), as the engine does."""
    hidden = model.hidden_states(*right_padded([s["input_ids"] for s in batch]))
    rows, predicting, labels, sizes = [], [], [], []
    for row, s in enumerate(batch):
        positions = [k for k in range(1, len(s["input_ids"])) if s["loss_mask"][k]]
        rows += [row] * len(positions)
        predicting += [k - 1 for k in positions]
        labels += [s["input_ids"][k] for k in positions]
        sizes.append(len(positions))
    states = hidden[rows, predicting]
    scores = kernels.reference_score(states, model.head_weight, torch.tensor(labels), mean,
                                     **model.transform.kwargs())
    return [float(part.sum()) for part in scores.double().split(sizes)]


def run_static(model: ValuationModel, samples: list[dict], mean: torch.Tensor) -> tuple[float, list[float]]:
    start = time.perf_counter()
    values = []
    for i in range(0, len(samples), STATIC_BATCH):
        values += static_batch_values(model, samples[i:i + STATIC_BATCH], mean)
    return time.perf_counter() - start, values


@torch.inference_mode()
def run_plain_forward(model: ValuationModel, samples: list[dict]) -> float:
    """Hidden states only, length-sorted padded batches of 8: the forward's best case."""
    ordered = sorted(samples, key=lambda s: len(s["input_ids"]))
    start = time.perf_counter()
    for i in range(0, len(ordered), STATIC_BATCH):
        model.hidden_states(*right_padded([s["input_ids"] for s in ordered[i:i + STATIC_BATCH]]))
    return time.perf_counter() - start


async def run_engine(model: ValuationModel, samples: list[dict], reference: Reference,
                     budget: int) -> tuple[float, list[float]]:
    async with AsyncEngine(model, batch_tokens=budget, max_waiting=len(samples)) as engine:
        engine.put_reference("v", reference)
        start = time.perf_counter()
        results = {r.id: r.value async for r in _stream(engine, samples)}
        elapsed = time.perf_counter() - start
    return elapsed, [results[s["id"]] for s in samples]


async def _stream(engine: AsyncEngine, samples: list[dict]):
    async for result in engine.score_stream(samples, "v"):
        if result.error:
            raise RuntimeError(result.error)
        yield result


def measure_throughput(model: ValuationModel, samples: list[dict], reference: Reference, mean: torch.Tensor,
                       budget: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds and values of each way over all samples. The samples run in two halves, the
    ways in opposite orders (A B C, then C B A), so that a machine whose load drifts during
    the run (a shared one) biases no way more than another."""
    half = len(samples) // 2 // STATIC_BATCH * STATIC_BATCH
    ways = {
        "engine": lambda part: asyncio.run(run_engine(model, part, reference, budget)),
        "static": lambda part: run_static(model, part, mean),
        "plain": lambda part: (run_plain_forward(model, part), []),
    }
    seconds = dict.fromkeys(ways, 0.0)
    values: dict[str, list[float]] = {name: [] for name in ways}
    for part, order in ((samples[:half], list(ways)), (samples[half:], list(ways)[::-1])):
        for name in order:
            elapsed, part_values = ways[name](part)
            seconds[name] += elapsed
            values[name] += part_values
    return seconds, values


# ------------------------------------------------------------------ latency under load


class StaticBatchServer:
    """The baseline server: FIFO, takes up to 8 waiting samples, pads, forwards, scores."""

    def __init__(self, model: ValuationModel, mean: torch.Tensor) -> None:
        self.model, self.mean = model, mean
        self.queue: deque[tuple[dict, asyncio.Future]] = deque()
        self.wake = asyncio.Event()
        self.stopped = False
        self.executor = ThreadPoolExecutor(max_workers=1)

    def submit(self, sample: dict) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((sample, future))
        self.wake.set()
        return future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopped:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = [self.queue.popleft() for _ in range(min(STATIC_BATCH, len(self.queue)))]
            values = await loop.run_in_executor(self.executor, static_batch_values, self.model,
                                                [s for s, _ in batch], self.mean)
            for (_, future), value in zip(batch, values, strict=True):
                future.set_result(value)


@dataclass
class Load:
    bulk: list[dict]
    singles: list[dict]
    gaps: list[float]  # seconds between single arrivals (Poisson)
    duration: float


async def measure_latency(load: Load, submit_bulk, submit_single) -> list[float]:
    """Single-sample latencies (submission to result) while a bulk client keeps
    BULK_OUTSTANDING requests in flight; arrivals stop after ``load.duration``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    room = asyncio.Semaphore(BULK_OUTSTANDING)

    async def bulk_client() -> None:
        for sample in itertools.cycle(load.bulk):
            await room.acquire()
            if stop.is_set():
                return
            submit_bulk(sample).add_done_callback(lambda _: room.release())

    async def timed(sample: dict) -> float:
        start = loop.time()
        await submit_single(sample)
        return loop.time() - start

    bulk = loop.create_task(bulk_client())
    begin, waits = loop.time(), []
    for sample, gap in zip(load.singles, load.gaps, strict=False):
        await asyncio.sleep(gap)
        if loop.time() - begin > load.duration:
            break
        waits.append(loop.create_task(timed(sample)))
    latencies = await asyncio.gather(*waits)
    stop.set()
    room.release()
    await bulk
    return list(latencies)


async def engine_latency(model: ValuationModel, reference: Reference, load: Load, budget: int,
                         priority: bool) -> list[float]:
    engine = AsyncEngine(model, batch_tokens=budget, max_waiting=10 * BULK_OUTSTANDING,
                         policy="priority" if priority else "fcfs")
    engine.put_reference("v", reference)
    handles = []

    def submit_bulk(sample: dict) -> asyncio.Future:
        handles.append(engine.submit(sample, "v", priority=1))
        return handles[-1].future

    async with engine:
        latencies = await measure_latency(load, submit_bulk, lambda s: engine.score(s, "v", priority=0))
        for handle in handles:  # the bulk job is not waited for
            engine.cancel(handle.request_id)
    return latencies


async def static_latency(model: ValuationModel, mean: torch.Tensor, load: Load) -> list[float]:
    server = StaticBatchServer(model, mean)
    task = asyncio.get_running_loop().create_task(server.run())
    latencies = await measure_latency(load, server.submit, server.submit)
    server.stopped = True
    server.queue.clear()
    server.wake.set()
    await task
    server.executor.shutdown()
    return latencies


# ------------------------------------------------------------------ report


def write_report(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(results, indent=2))
    t, lat = results["throughput"], results["latency"]
    rows = [
        "| run | tokens/s | vs static arrival-8 |",
        "| --- | ---: | ---: |",
        f"| static batches of 8, arrival order, padded (forward + scores) | "
        f"{t['static_tok_s']:.0f} | 1.00 |",
        f"| engine, packed continuous batching (forward + scores) | {t['engine_tok_s']:.0f} | "
        f"**{t['engine_vs_static']:.2f}** (target >= 1.5) |",
        f"| plain hidden-state forward, length-sorted padded batches of 8 (no valuation) | "
        f"{t['plain_tok_s']:.0f} | {t['plain_tok_s'] / t['static_tok_s']:.2f} |",
    ]
    lat_rows = ["| server | single-sample latency p50 (s) | p99 (s) | singles |",
                "| --- | ---: | ---: | ---: |"]
    lat_rows += [f"| {name} | {v['p50']:.2f} | {v['p99']:.2f} | {v['n']} |" for name, v in lat.items()]
    w = results["workload"]
    text = f"""# Engine throughput and latency (CPU, embedded model)

Machine: {results['machine']}. Load average before / after the run: {results['load_before']} /
{results['load_after']} (other jobs shared the machine; numbers move with it).

Command: `{results['command']}` ({results['seconds']:.0f} s in all).

Workload: {w['samples']} samples, {w['tokens']} tokens (lengths log-normal, median 128,
clipped to 16..1024: mean {w['mean_length']:.0f}, max {w['max_length']}), two thirds of the
positions labelled; scores against a reference of {w['reference_samples']} samples.
Engine: `batch_tokens={results['budget']}` (longer samples chunked), attention
`{results['attention']}`. For {w['tokens']} real tokens, static batches of 8 in arrival
order compute {w['static_padded_tokens']} and length-sorted ones {w['sorted_padded_tokens']}.

## Throughput

{chr(10).join(rows)}

Valuation throughput of the engine against the plain forward: **{t['engine_vs_plain']:.2f}**
(target >= 0.8). Engine and static values agree to a relative {t['max_relative_difference']:.1e}.

## Latency of single samples under a bulk job

Poisson arrivals at half the engine's measured capacity ({results['arrival_rate']:.2f}
samples/s) for {results['latency_seconds']:.0f} s, while a bulk client keeps
{BULK_OUTSTANDING} samples in flight. Priority: singles 0, bulk 1 (lower runs first).

{chr(10).join(lat_rows)}

![throughput and latency](engine.png)
"""
    (out / "engine.md").write_text(text)
    plot(out / "engine.png", results)


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, lat = results["throughput"], results["latency"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["static arrival-8\n(+scores)", "engine\n(+scores)", "plain forward\nsorted-8"]
    left.bar(names, [t["static_tok_s"], t["engine_tok_s"], t["plain_tok_s"]],
             color=["#999999", "#1f77b4", "#bbbbbb"])
    left.set_ylabel("tokens / s")
    left.set_title("Throughput (CPU, smollm2-135m)")
    x = np.arange(len(lat))
    right.bar(x - 0.2, [v["p50"] for v in lat.values()], 0.4, label="p50")
    right.bar(x + 0.2, [v["p99"] for v in lat.values()], 0.4, label="p99")
    right.set_xticks(x, [name.replace(", ", "\n") for name in lat])
    right.set_yscale("log")
    right.set_ylabel("seconds")
    right.set_title("Single-sample latency under a bulk job")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--budget", type=int, default=512, help="engine batch_tokens")
    parser.add_argument("--latency-seconds", type=float, default=45.0)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). On cores shared with other "
                             "jobs, 1 thread is steadier: with 2 threads on 2 busy cores we saw the "
                             "same forward take from 3 to 12 s")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_average()
    model = load_model(args.model, device="cpu")
    vocab = model.vocab_size
    samples = make_samples(args.samples, seed=0, vocab=vocab, prefix="train")
    valid = make_samples(4, seed=1, vocab=vocab, prefix="valid")
    reference = Valuator(model, progress=False).reference(valid)
    mean = reference.mean().to(model.dtype)
    static_batch_values(model, samples[:2], mean)  # warm up

    seconds, values = measure_throughput(model, samples, reference, mean, args.budget)
    tokens = num_tokens(samples)
    gap = np.abs(np.subtract(values["engine"], values["static"]))
    difference = gap.max() / np.abs(values["static"]).max()
    throughput = {"engine_tok_s": tokens / seconds["engine"], "static_tok_s": tokens / seconds["static"],
                  "plain_tok_s": tokens / seconds["plain"], "max_relative_difference": float(difference)}
    throughput["engine_vs_static"] = throughput["engine_tok_s"] / throughput["static_tok_s"]
    throughput["engine_vs_plain"] = throughput["engine_tok_s"] / throughput["plain_tok_s"]
    print(json.dumps(throughput, indent=2), flush=True)

    singles = make_samples(400, seed=2, vocab=vocab, prefix="single")
    rate = 0.5 * throughput["engine_tok_s"] / (num_tokens(singles) / len(singles))
    gaps = np.random.default_rng(3).exponential(1 / rate, len(singles)).tolist()
    load = Load(make_samples(200, seed=4, vocab=vocab, prefix="bulk"), singles, gaps, args.latency_seconds)
    latency = {
        "static batches of 8, FIFO": asyncio.run(static_latency(model, mean, load)),
        "engine, FCFS": asyncio.run(engine_latency(model, reference, load, args.budget, False)),
        "engine, priority": asyncio.run(engine_latency(model, reference, load, args.budget, True)),
    }
    latency = {name: percentiles(values) for name, values in latency.items()}
    print(json.dumps(latency, indent=2), flush=True)

    lengths = [len(s["input_ids"]) for s in samples]
    from forvalue.engine.core.runner import ModelRunner

    write_report(args.out, {
        "machine": machine(), "load_before": load_before, "load_after": load_average(),
        "command": "FORVALUE_CACHE=/tmp/fvcache python -m forvalue.bench.perf.throughput "
                   f"--samples {args.samples} --budget {args.budget} "
                   f"--latency-seconds {args.latency_seconds:g}"
                   + (f" --threads {args.threads}" if args.threads else ""),
        "seconds": time.perf_counter() - started, "budget": args.budget,
        "attention": ModelRunner(model).attention,
        "workload": {"samples": len(samples), "tokens": tokens, "mean_length": float(np.mean(lengths)),
                     "max_length": max(lengths), "reference_samples": len(valid),
                     "static_padded_tokens": padded_tokens(lengths),
                     "sorted_padded_tokens": padded_tokens(sorted(lengths))},
        "throughput": throughput, "arrival_rate": rate, "latency_seconds": args.latency_seconds,
        "latency": latency,
    })


if __name__ == "__main__":
    main()
