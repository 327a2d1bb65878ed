"""The runner's packed attention modes side by side: forward tokens/s of varlen, flex, buckets.

Each mode runs the same pre-tokenised samples through a scheduler and the ModelRunner (the
forward and the gathering of label states; no valuation kernels), in alternating order over
the repeats (A B C, C B A, ...) so that a drifting machine load biases no mode. A mode the
model refuses is reported with its reason. On a CPU, with a small random Llama:

    python -m forvalue.bench.perf.attention_modes --out bench/results --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forvalue.engine import ValuationModel, load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.core.request import Request
from forvalue.engine.core.runner import ModelRunner
from forvalue.engine.core.scheduler import Scheduler
from forvalue.engine.inputs.samples import EncodedSample
from forvalue.engine.model.attention import PackingUnsupported

from ..common import load_average, machine

MODES = ("varlen", "flex", "buckets")


def lognormal_samples(n: int, seed: int, vocab: int, median: int = 256,
                      clip: tuple[int, int] = (32, 1024)) -> list[dict]:
    """Pre-tokenised samples, lengths log-normal (sigma 0.75) around ``median`` and clipped,
    the last two thirds of each labelled."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), 0.75, n)), *clip).astype(int)
    samples = []
    for i, length in enumerate(lengths.tolist()):
        prompt = length // 3
        samples.append({"id": f"s{seed}-{i}", "input_ids": rng.integers(0, vocab, length).tolist(),
                        "loss_mask": [0] * prompt + [1] * (length - prompt)})
    return samples


def encoded(samples: Sequence[dict]) -> list[EncodedSample]:
    return [EncodedSample(s["id"], "bench", tuple(s["input_ids"]), tuple(bool(m) for m in s["loss_mask"]),
                          truncated=False) for s in samples]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def runner_seconds(runner: ModelRunner, samples: Sequence[EncodedSample], budget: int,
                   max_seqs: int) -> float:
    """Wall seconds to run every sample through a scheduler and the runner."""
    scheduler = Scheduler(ValuationConfig(batch_tokens=budget, max_seqs=max_seqs))
    for index, sample in enumerate(samples):
        scheduler.add(Request(sample, index=index))
    start = time.perf_counter()
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        scheduler.update_from_output(output, runner.execute(output))
    _synchronize(runner.model.device)
    return time.perf_counter() - start


def compare_modes(model: ValuationModel, samples: Sequence[dict], budget: int, repeats: int = 2,
                  modes: Sequence[str] = MODES, max_seqs: int = 256) -> dict[str, Any]:
    """Tokens/s of each mode over ``repeats`` passes (after one warm-up pass each), and the
    mode "auto" takes on this model; a refused mode gets its reason instead."""
    batch = encoded(samples)
    tokens = sum(len(s.input_ids) for s in batch)
    runners, results = {}, {}
    for mode in modes:
        try:
            started = time.perf_counter()
            runners[mode] = ModelRunner(model, attention=mode, batch_tokens=budget)
            runner_seconds(runners[mode], batch[:8], budget, max_seqs)  # probe, compilation, allocation
            results[mode] = {"warmup_s": time.perf_counter() - started, "seconds": 0.0}
        except PackingUnsupported as error:
            results[mode] = {"refused": str(error)}
    for repeat in range(repeats):
        for mode in list(runners)[::1 if repeat % 2 == 0 else -1]:
            results[mode]["seconds"] += runner_seconds(runners[mode], batch, budget, max_seqs)
    for mode in runners:
        results[mode]["tokens_per_s"] = repeats * tokens / results[mode]["seconds"]
    auto = ModelRunner(model, batch_tokens=budget)
    return {"tokens": tokens, "samples": len(batch), "budget": budget, "repeats": repeats,
            "auto": auto.attention, "why_not_packed": auto.why_not_packed, "modes": results}


def small_llama(hidden: int, layers: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 192), intermediate_size=hidden * 8 // 3,
                         vocab_size=vocab, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def markdown(result: dict[str, Any], command: str) -> str:
    rows = ["| mode | tokens/s | vs varlen | warm-up s |", "|---|---:|---:|---:|"]
    base = result["modes"].get("varlen", {}).get("tokens_per_s")
    for mode, r in result["modes"].items():
        if "refused" in r:
            rows.append(f"| {mode} | refused: {r['refused']} | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        rows.append(f"| {mode} | {r['tokens_per_s']:.0f} | {ratio} | {r['warmup_s']:.1f} |")
    eager = (" Flex runs eagerly on a CPU (it computes the N x N scores; compiled flex is CUDA only, "
             "engine/model/attention.py says why)." if result["device"] == "cpu" else "")
    return (f"# Packed attention modes ({result['device']})\n\n{result['machine']}\n\n"
            f"Command: `{command}`\n\nWorkload: {result['samples']} samples, {result['tokens']} tokens "
            f"(lengths log-normal, median {result['median']}), token budget {result['budget']} per step, "
            f"{result['repeats']} timed passes per mode, forward and label gathering only; "
            f"model {result['model']}. Auto takes `{result['auto']}`.{eager}\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for attention-modes-DEVICE.{json,md}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--median", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is steadier on shared cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab = 8192
    model = load_model(small_llama(args.hidden, args.layers, vocab), device=device,
                       dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    samples = lognormal_samples(args.samples, 0, vocab, args.median, (16, args.budget))
    load_before = load_average()
    result = compare_modes(model, samples, args.budget, args.repeats)
    result.update(device=device.type, median=args.median,
                  model=f"random Llama, hidden {args.hidden}, {args.layers} layers",
                  machine=f"Machine: {machine()}. Load average before / after: {load_before} / "
                          f"{load_average()} (other jobs shared it; numbers move with them).")
    arguments = sys.argv[1:] if argv is None else argv
    command = "python -m forvalue.bench.perf.attention_modes " + " ".join(arguments)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention-modes-{device.type}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"attention-modes-{device.type}.md").write_text(markdown(result, command.strip()))
    print(markdown(result, command.strip()))


if __name__ == "__main__":
    main()
