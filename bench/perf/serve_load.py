"""Load on the gRPC server over loopback, against the same engine without RPC.

1. End to end, embedded model (CPU): 1, 4, 16 and 64 concurrent Score streams, each keeping
   one request outstanding (closed loop), against a ``forvalue serve`` subprocess:
   throughput, p50/p99 latency, errors, the server's peak memory. The baseline is the same
   engine in this process driven by as many coroutines awaiting ``engine.score``. Both are
   warmed up and run in alternating order (A B, B A, ...) so that a drifting machine load
   biases neither; besides wall time, the CPU seconds each spends per sample are counted
   (server process against this process), which the other jobs of a shared machine move far
   less. The offline Valuator on the same samples is reported too.
2. The RPC layer alone: with a tiny random model the compute is nearly free, so the server's
   CPU per request minus the engine's own CPU per request (pipelined streams) is what RPC
   handling costs; set against the embedded model's CPU per sample it gives the RPC share
   of a busy server. Target: under 10%.

    FORVALUE_CACHE=/tmp/fvcache python -m forvalue.bench.perf.serve_load --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forvalue.bindings import AsyncClient
from forvalue.engine import Reference, ValuationModel, Valuator, load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.serving.async_engine import AsyncEngine

from ..common import load_average, machine

CONCURRENCY = (1, 4, 16, 64)
PIPELINED = (1, 4)  # streams of the pipelined gRPC runs, against the in-process rows of 16 and 64
PIPELINE_DEPTH = 16
TARGET_RPC_SHARE = 0.10
Run = tuple[float, list[float], int]  # wall seconds, latencies, errors

# forvalue serve's own default, in the unit of the flag
SERVE_QUEUE_DELAY_MS = ValuationConfig.for_command("serve").max_queue_delay * 1000


def make_samples(n: int, seed: int, vocab: int, prefix: str, lengths: tuple[int, int]) -> list[dict]:
    """Pre-tokenised samples, the last two thirds of each labelled."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        prompt = length // 3
        samples.append({"id": f"{prefix}{i}", "input_ids": rng.integers(0, vocab, length).tolist(),
                        "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- load generators


async def in_process(engine: AsyncEngine, samples: list[dict], concurrency: int) -> Run:
    """``concurrency`` callers, each awaiting one sample at a time."""
    latencies: list[float] = []
    errors = 0

    async def caller(part: list[dict]) -> None:
        nonlocal errors
        for sample in part:
            sent = time.perf_counter()
            result = await engine.score(sample, "valid")
            latencies.append(time.perf_counter() - sent)
            errors += bool(result.error)

    start = time.perf_counter()
    await asyncio.gather(*[caller(samples[k::concurrency]) for k in range(concurrency)])
    return time.perf_counter() - start, latencies, errors


async def over_grpc(client: AsyncClient, samples: list[dict], concurrency: int, depth: int = 1) -> Run:
    """``concurrency`` Score streams on one channel, each with ``depth`` requests outstanding."""
    latencies: list[float] = []
    errors = 0

    async def stream(part: list[dict]) -> None:
        nonlocal errors
        room = asyncio.Semaphore(depth)
        sent: dict[str, float] = {}

        async def requests():
            for sample in part:
                await room.acquire()
                sent[sample["id"]] = time.perf_counter()
                yield sample

        async for result in client.score_stream(requests(), reference="valid"):
            latencies.append(time.perf_counter() - sent.pop(result.id))
            errors += bool(result.error)
            room.release()

    start = time.perf_counter()
    await asyncio.gather(*[stream(samples[k::concurrency]) for k in range(concurrency)])
    return time.perf_counter() - start, latencies, errors


async def measured(kind: str, concurrency: int, run: Callable[[], Awaitable[Run]], server_pid: int,
                   tokens: int, steps: Callable[[], Awaitable[int]], depth: int = 1) -> dict[str, Any]:
    """One run, with the CPU seconds of the process that valued (and of the gRPC client) and
    the engine steps it took."""
    own, server, steps_before = cpu_seconds(os.getpid()), cpu_seconds(server_pid), await steps()
    elapsed, latencies, errors = await run()
    own, server = cpu_seconds(os.getpid()) - own, cpu_seconds(server_pid) - server
    n = len(latencies)
    valuing_cpu, client_cpu = (server, own) if kind == "grpc" else (own, 0.0)
    return {"kind": kind, "concurrency": concurrency, "depth": depth, "seconds": elapsed, "samples": n,
            "samples_per_s": n / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
            "errors": errors, "cpu_ms_per_sample": 1000 * valuing_cpu / n,
            "client_cpu_ms_per_sample": 1000 * client_cpu / n,
            "samples_per_step": n / max(await steps() - steps_before, 1)}


# ---------------------------------------------------------------------- the server process


class ServerProcess:
    """``forvalue serve`` in a subprocess, on a free loopback port."""

    def __init__(self, model: str, reference: Path, queue_delay_ms: float) -> None:
        command = [sys.executable, "-m", "forvalue.bindings.cli", "serve", "--model", model, "--port", "0",
                   "--reference", f"valid={reference}", "--max-queue-delay-ms", str(queue_delay_ms)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log = []
        while not log or "serving on" not in log[-1]:
            log.append(self.process.stderr.readline())
            if not log[-1]:
                raise RuntimeError("the server did not start:\n" + "".join(log))
        self.address = log[-1].rsplit(" ", 1)[-1].strip()
        self.pid = self.process.pid

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(120)
        self.process.stderr.close()
        return status


# ---------------------------------------------------------------------- the two parts


def end_to_end(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    model = load_model(args.model, device="cpu")
    samples = make_samples(args.samples, 0, model.vocab_size, "train", (16, 32))
    tokens = sum(len(s["input_ids"]) for s in samples)
    valuator = Valuator(model, progress=False)
    reference = valuator.reference(make_samples(2, 1, model.vocab_size, "valid", (16, 16)))
    reference.save(folder / "valid.safetensors")
    server = ServerProcess(args.model, folder / "valid.safetensors", args.max_queue_delay_ms)
    try:
        runs = asyncio.run(_alternating_runs(model, reference, samples, server, tokens))
        peak_mb = server.peak_rss_mb()
    finally:
        exit_status = server.stop()
    start = time.perf_counter()
    valuator.score(samples, reference)
    return {"samples": len(samples), "tokens": tokens, "runs": runs, "server_peak_mb": peak_mb,
            "server_exit_status": exit_status,
            "valuator_tokens_per_s": tokens / (time.perf_counter() - start)}


async def _alternating_runs(model: ValuationModel, reference: Reference, samples: list[dict],
                            server: ServerProcess, tokens: int) -> list[dict[str, Any]]:
    runs = []
    async with AsyncEngine(model) as engine, AsyncClient(server.address, timeout=None) as client:
        engine.put_reference("valid", reference)

        async def engine_steps() -> int:
            return engine.stats().steps

        async def server_steps() -> int:
            return (await client.stats())["steps"]

        def run(kind: str, c: int, depth: int = 1) -> Awaitable[dict[str, Any]]:
            if kind == "grpc":
                return measured(kind, c, lambda: over_grpc(client, samples, c, depth), server.pid, tokens,
                                server_steps, depth)
            return measured(kind, c, lambda: in_process(engine, samples, c), server.pid, tokens, engine_steps)

        await in_process(engine, samples[:8], 4)  # warm-up: first steps allocate
        await over_grpc(client, samples[:8], 4)
        for i, c in enumerate(CONCURRENCY):
            for kind in ("in-process", "grpc")[::1 if i % 2 == 0 else -1]:
                runs.append(await run(kind, c))
                print(json.dumps(runs[-1]), flush=True)
        for streams in PIPELINED:  # bulk clients: several requests in flight per stream
            runs.append(await run("grpc", streams, PIPELINE_DEPTH))
            print(json.dumps(runs[-1]), flush=True)
    return runs


def rpc_cost(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """CPU per request with near-free compute: the engine alone against a gRPC server."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64))
    tiny.save_pretrained(folder / "tiny")
    model = load_model(folder / "tiny", device="cpu")
    samples = make_samples(args.tiny_samples, 2, 128, "tiny", (16, 32))
    reference = Valuator(model, progress=False).reference(samples[:4])
    reference.save(folder / "tiny.safetensors")
    server = ServerProcess(str(folder / "tiny"), folder / "tiny.safetensors", args.max_queue_delay_ms)

    async def pipelined() -> list[dict[str, Any]]:
        async with AsyncEngine(model) as engine, AsyncClient(server.address, timeout=None) as client:
            engine.put_reference("valid", reference)

            async def engine_alone() -> Run:
                start = time.perf_counter()
                results = [r async for r in engine.score_stream(samples, "valid")]
                return time.perf_counter() - start, [0.0] * len(results), sum(bool(r.error) for r in results)

            async def engine_steps() -> int:
                return engine.stats().steps

            async def server_steps() -> int:
                return (await client.stats())["steps"]

            return [await measured("in-process", 1, engine_alone, server.pid, 1, engine_steps),
                    await measured("grpc", 4, lambda: over_grpc(client, samples, 4, depth=64), server.pid, 1,
                                   server_steps, 64)]

    try:
        alone, rpc = asyncio.run(pipelined())
    finally:
        server.stop()
    return {"samples": len(samples), "in_process_rps": alone["samples_per_s"],
            "grpc_rps": rpc["samples_per_s"], "errors": rpc["errors"],
            "engine_cpu_ms": alone["cpu_ms_per_sample"],
            "server_cpu_ms": rpc["cpu_ms_per_sample"], "client_cpu_ms": rpc["client_cpu_ms_per_sample"],
            "rpc_cpu_ms_per_request": rpc["cpu_ms_per_sample"] - alone["cpu_ms_per_sample"]}


# ---------------------------------------------------------------------- report


def _row(label: str, base: dict[str, Any], over: dict[str, Any]) -> str:
    return (f"| {label} | {base['tokens_per_s']:.1f} | {over['tokens_per_s']:.1f} "
            f"| {1 - over['tokens_per_s'] / base['tokens_per_s']:+.1%} "
            f"| {base['cpu_ms_per_sample']:.0f} | {over['cpu_ms_per_sample']:.0f} "
            f"| {over['cpu_ms_per_sample'] / base['cpu_ms_per_sample'] - 1:+.1%} "
            f"| {base['samples_per_step']:.1f} | {over['samples_per_step']:.1f} "
            f"| {base['p50_s']:.2f} / {base['p99_s']:.2f} "
            f"| {over['p50_s']:.2f} / {over['p99_s']:.2f} | {over['errors']} |")


def _reading(by: dict[tuple[str, int, int], dict[str, Any]], delay_ms: float) -> str:
    base, over = by["in-process", 4, 1], by["grpc", 4, 1]
    split = f"{over['samples_per_step']:.1f} against {base['samples_per_step']:.1f}"
    small = over["cpu_ms_per_sample"] / base["cpu_ms_per_sample"] - 1
    big = [by["grpc", c, 1]["cpu_ms_per_sample"] / by["in-process", c, 1]["cpu_ms_per_sample"] - 1
           for c in CONCURRENCY if c >= 16]
    common = """Reading: wall-clock rows move with the other jobs on the machine (a row where gRPC comes out
faster shows that noise). CPU per sample shows where the RPC path costs: not in RPC handling
(next section) but in batching. A caller's next request reaches the server a round trip after
its result. A CPU step has a large fixed cost (reading the `V x d` head and reference mean), so
fewer samples per step cost CPU per sample."""
    if delay_ms == 0:
        return common + f""" With no queue delay (`--max-queue-delay-ms 0`) the next step has
already started when those requests arrive, so closed-loop callers split into groups that take
turns (gRPC samples/step: {split} at 4 x 1), which costs {small:+.0%} CPU per sample at 4 x 1 and
{min(big):+.0%} to {max(big):+.0%} from 16 requests in flight."""
    return common + f""" With the server's queue delay of {delay_ms:g} ms after each step that
answered requests, those requests join the next step (gRPC samples/step: {split} at 4 x 1):
CPU cost {small:+.0%} per sample at 4 x 1, {min(big):+.0%} to {max(big):+.0%} from 16 requests in flight."""


HEADER = ("| gRPC streams x outstanding | in-process tok/s | gRPC tok/s | wall cost "
          "| in-process CPU ms/sample | server CPU ms/sample | CPU cost "
          "| in-process samples/step | gRPC samples/step "
          "| in-process p50 / p99 (s) | gRPC p50 / p99 (s) | gRPC errors |\n"
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def _load_note(results: dict[str, Any]) -> str:
    # The benchmark itself keeps about two cores busy; a 1-minute load well above that means others.
    one_minute = [float(results[key].split()[0]) for key in ("load_before", "load_after")]
    if max(one_minute) > (os.cpu_count() or 1) + 1:
        return ("Other jobs shared the cores during the run: wall-clock figures move by tens of per "
                "cent with them; CPU seconds per sample move much less.")
    return "No other job ran on the machine during the run."


def write_report(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    e2e, rpc = results["end_to_end"], results["rpc"]
    by = {(r["kind"], r["concurrency"], r["depth"]): r for r in e2e["runs"]}
    rows = [_row(f"{c} x 1", by["in-process", c, 1], by["grpc", c, 1]) for c in CONCURRENCY]
    rows += [_row(f"{c} x {PIPELINE_DEPTH}", by["in-process", c * PIPELINE_DEPTH, 1],
                  by["grpc", c, PIPELINE_DEPTH]) for c in PIPELINED]
    compute_ms = float(np.median([r["cpu_ms_per_sample"] for r in e2e["runs"] if r["kind"] == "in-process"]))
    share = rpc["rpc_cpu_ms_per_request"] / compute_ms
    text = f"""# gRPC serving load (CPU, embedded model, loopback)

Machine: {results['machine']}.
Load average before / after: {results['load_before']} / {results['load_after']}.
{_load_note(results)}

Command: `{results['command']}` ({results['seconds']:.0f} s in all).

## End to end

{e2e['samples']} pre-tokenised samples ({e2e['tokens']} tokens, 16..32 each, two thirds labelled), a
reference of 2 samples. N streams x K outstanding: N Score streams, each keeping K requests in
flight (K = 1: a closed loop of interactive callers). Baseline: the same engine in the benchmark
process driven by N x K coroutines awaiting `engine.score`. Server: `forvalue serve` in a
subprocess, default limits; client: one `AsyncClient` channel in the benchmark process. Both
warmed up; the order of the two alternates per row. Costs: gRPC against in-process (positive:
gRPC slower or more CPU).

{HEADER}
{chr(10).join(rows)}

{_reading(by, results['max_queue_delay_ms'])}

Server peak memory (VmHWM of the server process over all runs): **{e2e['server_peak_mb']:.0f} MB**
(the float32 model, its `V x d` head and reference mean, and the working set). Exit status
after SIGTERM: {e2e['server_exit_status']}. Offline `Valuator.score` on the same samples:
{e2e['valuator_tokens_per_s']:.1f} tok/s.

## The RPC layer alone

A tiny random model (1 layer, d=32, V=128) makes compute nearly free. {rpc['samples']} samples:
engine alone {rpc['in_process_rps']:.0f} samples/s at {rpc['engine_cpu_ms']:.2f} CPU ms each; over gRPC
(4 pipelined streams, 64 outstanding each) {rpc['grpc_rps']:.0f} samples/s at {rpc['server_cpu_ms']:.2f}
server CPU ms each ({rpc['errors']} errors), plus {rpc['client_cpu_ms']:.2f} client CPU ms. RPC handling
costs the server **{rpc['rpc_cpu_ms_per_request']:.2f} CPU ms per request**, against {compute_ms:.0f} CPU ms
of compute per sample of the embedded model (median in-process row above): **{share:.2%} of a busy
server** (target: under {TARGET_RPC_SHARE:.0%}). Even counting all of the tiny server's CPU as RPC
cost ({rpc['server_cpu_ms']:.2f} ms), and the client's too, the share stays at
{(rpc['server_cpu_ms'] + rpc['client_cpu_ms']) / compute_ms:.2%}. Samples of a realistic length (hundreds
of tokens) make it smaller still.
"""
    (out / "serve.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=128, help="samples per end-to-end run")
    parser.add_argument("--tiny-samples", type=int, default=3000, help="samples of the RPC-only run")
    parser.add_argument("--max-queue-delay-ms", type=float, default=SERVE_QUEUE_DELAY_MS,
                        help="the server's queue delay (forvalue serve's default unless given)")
    args = parser.parse_args(argv)
    started, load_before = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as tmp:
        rpc = rpc_cost(args, Path(tmp))
        print(json.dumps(rpc), flush=True)
        e2e = end_to_end(args, Path(tmp))
    write_report(args.out, {
        "machine": machine(), "load_before": load_before, "load_after": load_average(),
        "command": "python -m forvalue.bench.perf.serve_load "
                   f"--samples {args.samples} --tiny-samples {args.tiny_samples} "
                   f"--max-queue-delay-ms {args.max_queue_delay_ms:g} --out {args.out}",
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "seconds": time.perf_counter() - started, "end_to_end": e2e, "rpc": rpc})


if __name__ == "__main__":
    main()
