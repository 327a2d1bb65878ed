"""Latency of one sample: an idle server against the in-process paths and the compute floor.

One 64-token sample with 32 label tokens, valued one at a time, through each path:

- ``forward``: the plain backbone forward of the sample (``model.hidden_states``);
- ``forward+vocab``: the forward and the vocabulary work of its labels (``reference_score``
  of the label states against the reference's resident mean gradient): the floor;
- ``valuator``: in-process ``Valuator.score([sample], reference)``;
- ``async_engine``: in-process ``AsyncEngine.score(sample, "valid")`` (``forvalue serve``'s options);
- ``grpc_call``: an idle ``forvalue serve`` subprocess through ``Client.score_stream([sample])``,
  one call per sample;
- ``grpc_stream``: the same server, one long-lived Score stream that sends the next sample
  when the previous result arrives.

Each path is warmed up, then measured in rounds that alternate the order of the paths (a
drifting machine load biases none of them), 30 samples per path in all by default. The
in-process paths run with the server's torch threads unless ``--threads`` says otherwise.

    python -m forvalue.bench.perf.latency --out bench/results/latency
    python -m forvalue.bench.perf.latency --quick --out /tmp/latency   # a tiny random model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forvalue import kernels
from forvalue.bindings import Client
from forvalue.bindings.cli.serve import torch_threads
from forvalue.engine import Reference, ValuationModel, Valuator, load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.serving.async_engine import AsyncEngine
from forvalue.engine.valuation.label_math import LabelMath
from forvalue.engine.valuation.scoring import ResidentReference

from ..common import load_average, machine
from .serve_load import SERVE_QUEUE_DELAY_MS, ServerProcess, cpu_seconds

PATHS = ("forward", "forward+vocab", "valuator", "async_engine", "grpc_call", "grpc_stream")
ENGINE_PATHS = PATHS[3:]  # the paths that report the engine's queue and compute seconds
LENGTH, LABELS = 64, 32
TARGET_SERVER = 1.15  # idle server p50 / in-process Valuator p50
TARGET_IN_PROCESS = 1.2  # in-process Valuator p50 / (forward + vocabulary work) p50
# Seconds seen by the caller, the engine's queue and compute seconds, CPU seconds of this
# process and of the server process.
Timed = tuple[float, float, float, float, float]


def make_sample(vocab: int, seed: int, name: str) -> dict[str, Any]:
    """``LENGTH`` random token ids, the second half labelled (``LABELS`` label tokens)."""
    ids = np.random.default_rng(seed).integers(0, vocab, LENGTH).tolist()
    return {"id": name, "input_ids": ids, "loss_mask": [0] * (LENGTH - LABELS) + [1] * LABELS}


# ---------------------------------------------------------------------- the paths


class Paths:
    """One callable per path, each valuing ``sample`` once and returning its timings."""

    def __init__(self, model: ValuationModel, reference: Reference, sample: dict[str, Any],
                 server: ServerProcess, queue_delay: float) -> None:
        self.model, self.reference, self.sample = model, reference, sample
        self.ids = torch.tensor([sample["input_ids"]])
        self.mask = torch.ones_like(self.ids)
        # Label k is predicted by the state of token k - 1.
        positions = [k for k in range(1, LENGTH) if sample["loss_mask"][k]]
        self.predicting = torch.tensor([k - 1 for k in positions])
        self.labels = torch.tensor([sample["input_ids"][k] for k in positions])
        self.matrix = ResidentReference(reference, LabelMath(model)).matrix  # resident, as served
        self.offline = Valuator(model, progress=False)
        self.loop = asyncio.new_event_loop()
        self.queue_delay = queue_delay
        self.engine = AsyncEngine(model, ValuationConfig.for_command("serve", max_queue_delay=queue_delay))
        self.loop.run_until_complete(self.engine.__aenter__())
        self.engine.put_reference("valid", reference)
        self.server_pid = server.pid
        self.client = Client(server.address, timeout=None)
        self.client.wait_until_serving(600)
        self._stream = _LongStream(self.client, "valid")

    def close(self) -> None:
        self._stream.close()
        self.client.close()
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()

    def run(self, path: str) -> Timed:
        """Value the sample once; with the CPU seconds this process and the server spent."""
        method: Callable[[], tuple[float, float, float]] = getattr(self, path.replace("+", "_"))
        # Idle: past the queue delay that follows the previous answer, which a sample sent
        # sooner waits out (grpc_stream, a closed loop, shows that). The in-process engine's
        # event loop only runs inside run_until_complete, so it sleeps there.
        if path == "async_engine":
            self.loop.run_until_complete(asyncio.sleep(self.queue_delay))
        elif path == "grpc_call":
            time.sleep(self.queue_delay)
        own, server = cpu_seconds(os.getpid()), cpu_seconds(self.server_pid)
        timed = method()
        return (*timed, cpu_seconds(os.getpid()) - own, cpu_seconds(self.server_pid) - server)

    def forward(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        self.model.hidden_states(self.ids, self.mask)
        return time.perf_counter() - start, 0.0, 0.0

    def forward_vocab(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        hidden = self.model.hidden_states(self.ids, self.mask)[0, self.predicting]
        scores = kernels.reference_score(hidden, self.model.head_weight, self.labels, self.matrix,
                                         **self.model.transform.kwargs())
        float(scores.double().sum())
        return time.perf_counter() - start, 0.0, 0.0

    def valuator(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        self.offline.score([self.sample], self.reference)
        return time.perf_counter() - start, 0.0, 0.0

    def async_engine(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        result = self.loop.run_until_complete(self.engine.score(self.sample, "valid"))
        return _checked(result, time.perf_counter() - start)

    def grpc_call(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        [result] = self.client.score_stream([self.sample], reference="valid")
        return _checked(result, time.perf_counter() - start)

    def grpc_stream(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        result = self._stream.score(self.sample)
        return _checked(result, time.perf_counter() - start)


def _checked(result: Any, seconds: float) -> tuple[float, float, float]:
    if result.error:
        raise RuntimeError(f"the sample was not scored: {result.error}")
    return seconds, result.queue_seconds, result.compute_seconds


class _LongStream:
    """One Score call kept open: a sample goes out when ``score`` is called, after the previous
    result came back (a closed-loop caller with one request outstanding)."""

    def __init__(self, client: Client, reference: str) -> None:
        self._samples: queue.Queue[dict | None] = queue.Queue()
        self._results = client.score_stream(self._feed(), reference=reference)

    def _feed(self) -> Iterator[dict]:
        while (sample := self._samples.get()) is not None:
            yield sample

    def score(self, sample: dict[str, Any]) -> Any:
        self._samples.put(sample)
        return next(self._results)

    def close(self) -> None:
        self._samples.put(None)
        for _ in self._results:  # the call ends once the server has answered everything
            pass


# ---------------------------------------------------------------------- measuring


def measure(paths: Paths, samples: int, warmup: int, rounds: int) -> dict[str, list[Timed]]:
    """``warmup`` unmeasured samples per path, then ``samples`` per path in ``rounds`` rounds,
    the order of the paths reversed every other round."""
    for path in PATHS:
        for _ in range(warmup):
            paths.run(path)
    timings: dict[str, list[Timed]] = {path: [] for path in PATHS}
    for r in range(rounds):
        count = samples // rounds + (r < samples % rounds)
        for path in PATHS if r % 2 == 0 else PATHS[::-1]:
            timings[path] += [paths.run(path) for _ in range(count)]
    return timings


def summary(timed: list[Timed]) -> dict[str, float]:
    """Quantiles and mean in milliseconds; the means of the engine's queue and compute time and
    of the CPU time of this process and of the server beside."""
    ms = 1000 * np.array(timed)
    seconds = ms[:, 0]
    return {"p50_ms": float(np.percentile(seconds, 50)), "p90_ms": float(np.percentile(seconds, 90)),
            "p99_ms": float(np.percentile(seconds, 99)), "mean_ms": float(seconds.mean()),
            "min_ms": float(seconds.min()), "engine_queue_ms": float(ms[:, 1].mean()),
            "engine_compute_ms": float(ms[:, 2].mean()), "cpu_ms": float(ms[:, 3].mean()),
            "server_cpu_ms": float(ms[:, 4].mean())}


def ratios(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    p50 = {path: s["p50_ms"] for path, s in stats.items()}
    return {"grpc_call/valuator": p50["grpc_call"] / p50["valuator"],
            "grpc_stream/valuator": p50["grpc_stream"] / p50["valuator"],
            "async_engine/valuator": p50["async_engine"] / p50["valuator"],
            "valuator/floor": p50["valuator"] / p50["forward+vocab"],
            "vocab_ms": p50["forward+vocab"] - p50["forward"]}


def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def thread_names(pid: int) -> dict[str, int]:
    """How many threads of each name a process runs (OpenMP, gRPC, Python)."""
    names: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


def tiny_model(folder: Path) -> str:
    """A random 1-layer Llama saved to ``folder`` (the ``--quick`` model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=2 * LENGTH)).save_pretrained(folder / "tiny")
    return str(folder / "tiny")


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    name = tiny_model(folder) if args.quick else args.model
    model = load_model(name, device="cpu")
    sample = make_sample(model.vocab_size, 0, "train")
    reference = Valuator(model, progress=False).reference(
        [make_sample(model.vocab_size, seed, f"valid{seed}") for seed in (1, 2)])
    reference.save(folder / "valid.safetensors")
    server = ServerProcess(name, folder / "valid.safetensors", args.max_queue_delay_ms)
    try:
        paths = Paths(model, reference, sample, server, args.max_queue_delay_ms / 1000)
        try:
            timings = measure(paths, args.samples, args.warmup, args.rounds)
            threads = thread_names(server.pid)
        finally:
            paths.close()
    finally:
        exit_status = server.stop()
    stats = {path: summary(timings[path]) for path in PATHS}
    # What Valuator.score does per call beyond the engine's step: make the reference resident.
    label_math = LabelMath(model)
    resident = [_seconds(lambda: ResidentReference(reference, label_math)) for _ in range(5)]
    return {"model": model.name, "stats": stats, "ratios": ratios(stats), "server_threads": threads,
            "resident_reference_ms": 1000 * float(np.median(resident)),
            "server_exit_status": exit_status,
            "samples_ms": {path: [round(1000 * t[0], 2) for t in timings[path]] for path in PATHS}}


# ---------------------------------------------------------------------- report


def _verdict(value: float, target: float) -> str:
    return f"**{value:.2f}x** (target <= {target:g}x: {'met' if value <= target else 'not met'})"


HEADER = ("| path | p50 ms | p90 ms | p99 ms | mean ms | min ms | engine queue ms | engine compute ms "
          "| caller CPU ms | server CPU ms |\n| --- |" + " ---: |" * 9)


def _row(path: str, s: dict[str, float]) -> str:
    engine = f"{s['engine_queue_ms']:.2f} | {s['engine_compute_ms']:.1f}" if path in ENGINE_PATHS else "- | -"
    return (f"| {path} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['mean_ms']:.1f} "
            f"| {s['min_ms']:.1f} | {engine} | {s['cpu_ms']:.0f} | {s['server_cpu_ms']:.0f} |")


def write_report(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stats, r = results["stats"], results["ratios"]
    rows = "\n".join(_row(path, s) for path, s in stats.items())
    threads = ", ".join(f"{name} x{count}" for name, count in results["server_threads"].items())
    text = f"""# Latency of one sample ({results['model']}, CPU)

Machine: {results['machine']} (the in-process paths; the server: {results['server_torch_threads']}).
Load average (1, 5, 15 min) before / after: {results['load_before']} / {results['load_after']}.
Command: `{results['command']}` ({results['seconds']:.0f} s in all).

One pre-tokenised sample of {LENGTH} tokens with {LABELS} label tokens, a reference of 2 such
samples, valued one at a time: {results['warmup']} warm-up samples per path, then
{results['samples']} per path in {results['rounds']} rounds that alternate the order of the paths.
The server is a `forvalue serve` subprocess (queue delay {results['max_queue_delay_ms']:g} ms, the
in-process AsyncEngine's too), reached over loopback by the blocking `Client`: `grpc_call` opens
one Score call per sample, `grpc_stream` keeps one call open and sends the next sample when the
previous result arrives. `async_engine` and `grpc_call` send each sample once the queue delay
that follows the previous answer has passed (an idle server); `grpc_stream`'s samples arrive
inside it, as a closed-loop caller's do.
The engine columns are the means of the queue and compute times the engine reports with
each result (admission to the step's start; the step's start to the end of its forward: the
vocabulary work comes after). The CPU columns are the mean CPU time per sample of the
benchmark process (the caller; for the in-process paths, all the work) and of the server
process, all threads: unlike wall time, other jobs on the machine barely move them.

{HEADER}
{rows}

- idle server / in-process Valuator (p50): {_verdict(r['grpc_call/valuator'], TARGET_SERVER)};
  long-lived stream: {r['grpc_stream/valuator']:.2f}x;
  in-process AsyncEngine: {r['async_engine/valuator']:.2f}x.
- in-process Valuator / (forward + vocabulary work) (p50): {_verdict(r['valuator/floor'], TARGET_IN_PROCESS)};
  the vocabulary work of {LABELS} labels adds {r['vocab_ms']:.1f} ms to the forward (p50s); each
  `Valuator.score` call also makes the reference resident (`ResidentReference`, the mean
  gradient `V x d`): {results['resident_reference_ms']:.1f} ms (median of 5).

Server threads at the end of the run: {threads}. Exit status after SIGTERM:
{results['server_exit_status']}.
"""
    out.with_suffix(".md").write_text(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency"),
                        help="writes OUT.md and OUT.json")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=30, help="measured samples per path")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured samples per path first")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the paths (order alternates)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=SERVE_QUEUE_DELAY_MS,
                        help="the server's queue delay (forvalue serve's default unless given)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the in-process paths (default: forvalue serve's, one "
                             "less than torch's choice, so that every path runs with the same threads)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a tiny random model, 3 samples per path, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.warmup, args.rounds = 3, 1, 1
    server_threads, previous = torch_threads(), torch.get_num_threads()
    torch.set_num_threads(args.threads or server_threads)  # before the engine's thread runs torch
    started, load_before = time.perf_counter(), load_average()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(args, Path(tmp))
        results["machine"] = machine()  # with the in-process paths' threads
    finally:
        torch.set_num_threads(previous)  # a caller's process (a test) keeps its setting
    results.update(
        load_before=load_before, load_after=load_average(),
        command=" ".join(["python -m forvalue.bench.perf.latency",
                          *(argv if argv is not None else sys.argv[1:])]),
        samples=args.samples, warmup=args.warmup, rounds=args.rounds, server_torch_threads=server_threads,
        max_queue_delay_ms=args.max_queue_delay_ms, seconds=time.perf_counter() - started)
    write_report(args.out, results)
    return results


if __name__ == "__main__":
    main()
