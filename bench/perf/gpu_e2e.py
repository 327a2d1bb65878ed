"""The whole engine on a GPU: valuation throughput, FLOP utilisation and latency at real shapes.

Per model shape (random weights built on the device in bf16, no CPU copy: Qwen2.5-1.5B first,
then SmolLM2-135M and Llama-3-8B), on pre-tokenised samples (lengths log-normal, median 256,
clipped to 32..1024, the last two thirds labelled):

- the engine valuing them against a reference (``Valuator.score``): tokens/s, samples/hour;
- the same model's Hugging Face forward with logits, and without the head, on length-sorted
  batches padded to a few bucket sizes (built on the device beforehand, which favours them);
  tokens/s count real tokens for every way, and the ratios set the engine against both;
- model FLOP utilisation: the engine's useful FLOPs (backbone, causal attention, and the
  reference-score kernel's ``4 V d`` per label) per second, over a bf16 GEMM rate measured here
  (8192^3 torch.matmul);
- through the AsyncEngine (serving defaults): the saturation rate, then single-sample latency
  p50/p99 under Poisson arrivals at half that rate.

Then, if time is left, the runner's packed attention modes side by side at the first shape
(bench/perf/attention_modes.py). Each section writes ``e2e-SECTION.json`` and a line of ``e2e.md``
as it finishes; one failing or out of time writes its reason instead. ``--dry-run``: the same
code on a CPU, tiny shapes, float32, in seconds.

    bench/gpu_check.sh DIR --e2e [--dry-run]
    python -m forvalue.bench.perf.gpu_e2e --out DIR [--dry-run] [--budget-s 270] [--sections NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from forvalue.engine import Reference, ValuationModel, Valuator, load_model
from forvalue.engine.core.runner import ModelRunner
from forvalue.engine.serving.async_engine import AsyncEngine

from ..common import machine, percentiles
from .attention_modes import compare_modes, lognormal_samples


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "qwen2" or "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


SHAPES = (Shape("qwen2.5-1.5b", "qwen2", 1536, 28, 12, 2, 8960, 151936, True),
          Shape("smollm2-135m", "llama", 576, 30, 9, 3, 1536, 49152, True),
          Shape("llama-3-8b", "llama", 4096, 32, 32, 8, 14336, 128256, False))


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: torch.dtype
    samples: tuple[int, ...]  # training samples valued per pass, per shape in SHAPES order
    median: int
    clip: tuple[int, int]
    buckets: tuple[int, ...]  # padded widths of the Hugging Face batches
    batch_tokens: int  # the engine's token budget per step, and the padded batches' size
    seconds: float  # the least time of a throughput measurement (whole passes)
    latency_seconds: tuple[float, ...]  # per shape in SHAPES order
    gemm_size: int
    min_section_s: float  # a section needs this much time left to start


# Sized so that one call stays under 5 minutes on an H200, compilations included (an estimate:
# none of this has run on a GPU yet): the 30 s latency run is for the 1.5B target shape, and
# one pass of the 8B shape takes seconds, so it values fewer samples.
GPU_PLAN = Plan("cuda", torch.bfloat16, (512, 512, 256), 256, (32, 1024), (64, 128, 256, 512, 1024), 4096,
                5.0, (30.0, 10.0, 10.0), 8192, 40.0)
DRY_PLAN = Plan("cpu", torch.float32, (10, 10, 10), 24, (8, 64), (16, 32, 64), 256, 0.1, (1.0, 0.3, 0.3),
                256, 0.0)
TARGETS = ("targets (not measured here): valuation >= 0.9x HF forward with logits, >= 0.75x head-less, "
           ">= 50% MFU at the 1.5B shape, p50 < 20 ms at half load")
TABLE_HEAD = ("| section | attention | engine tok/s | samples/h | HF+logits tok/s | HF head-less tok/s | "
              "vs logits | vs head-less | MFU | p50 ms | p99 ms |\n|---|---|---:|---:|---:|---:|---:|---:|"
              "---:|---:|---:|")


def tiny(shape: Shape) -> Shape:
    """The dry run's stand-in: the same family, grouped-query heads and tying, tiny sizes."""
    return dataclasses.replace(shape, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)


def build(shape: Shape, plan: Plan) -> torch.nn.Module:
    """Random weights created on the device in the plan's dtype (no host copy of the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[shape.family]
    config = config_class(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                          num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                          intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                          tie_word_embeddings=shape.tied, max_position_embeddings=4096)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(plan.dtype)  # what transformers' own loading does for a torch_dtype
    try:
        with torch.device(plan.device):
            return model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)


# ------------------------------------------------------------------ measurements


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_tflops(plan: Plan) -> float:
    """Dense matmul rate in the plan's dtype (best of 3 timings of 10 products)."""
    n = plan.gemm_size
    a, b = (torch.randn(n, n, device=plan.device, dtype=plan.dtype) for _ in range(2))
    best = float("inf")
    for _ in range(4):  # the first is a warm-up
        synchronize(plan.device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize(plan.device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best / 1e12


def timed_passes(one_pass: Callable[[], object], seconds: float, device: str) -> tuple[float, int]:
    """Whole passes until at least ``seconds`` have gone: (seconds, passes)."""
    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < seconds:
        one_pass()
        passes += 1
    synchronize(device)
    return time.perf_counter() - start, passes


def padded_batches(samples: Sequence[dict], plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Length-sorted batches, each padded (right) to the smallest bucket that holds its longest
    sample, with ``rows x width <= batch_tokens``; ids and masks already on the device."""
    lengths = sorted(len(s["input_ids"]) for s in samples)
    ordered = sorted(samples, key=lambda s: len(s["input_ids"]))
    batches, start = [], 0
    while start < len(ordered):
        end = start + 1
        while end < len(ordered) and (end + 1 - start) * _bucket(lengths[end], plan) <= plan.batch_tokens:
            end += 1
        width = _bucket(lengths[end - 1], plan)
        ids = torch.zeros((end - start, width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sample in enumerate(ordered[start:end]):
            ids[row, :len(sample["input_ids"])] = torch.tensor(sample["input_ids"])
            mask[row, :len(sample["input_ids"])] = 1
        batches.append((ids.to(plan.device), mask.to(plan.device)))
        start = end
    return batches


def _bucket(length: int, plan: Plan) -> int:
    return next((width for width in plan.buckets if width >= length), length)


def model_flops(hf: torch.nn.Module, samples: Sequence[dict]) -> dict[str, float]:
    """Useful FLOPs of one pass over the samples, per way: the backbone's matmuls and causal
    attention on real tokens (all ways), plus the engine's reference-score kernel (``4 V d``
    per label) or the full head of the forward with logits (``2 V d`` per token)."""
    config = hf.config
    backbone = hf.get_decoder()
    matmul = sum(m.weight.numel() for m in backbone.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.float64)
    labels = sum(sum(s["loss_mask"][1:]) for s in samples)
    pairs = (lengths * (lengths + 1) / 2).sum()  # (query, key) pairs of causal attention
    attention = 4.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * pairs
    vd = float(config.vocab_size * config.hidden_size)
    forward = 2.0 * matmul * lengths.sum() + attention
    return {"engine": forward + 4 * vd * labels, "hf_logits": forward + 2 * vd * lengths.sum(),
            "hf_headless": forward}


# ------------------------------------------------------------------ serving


async def serving(model: ValuationModel, reference: Reference, samples: Sequence[dict], seconds: float,
                  latency_seconds: float) -> dict[str, float]:
    """Through the AsyncEngine: the saturation rate (whole streams of the samples for at least
    ``seconds``), then single-sample latency under Poisson arrivals at half that rate."""
    async with AsyncEngine(model) as engine:
        engine.put_reference("v", reference)
        await _stream(engine, samples[:8])  # warm-up at the serving token budget
        done, start = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - start < seconds:
            done += await _stream(engine, samples)
        saturation = done / (time.perf_counter() - start)
        latencies = await _poisson_latencies(engine, samples, saturation / 2, latency_seconds)
    stats = percentiles(latencies)
    return {"saturation_samples_per_s": saturation, "arrival_rate_per_s": saturation / 2,
            "latency_seconds": latency_seconds, "latency_p50_ms": 1e3 * stats["p50"],
            "latency_p99_ms": 1e3 * stats["p99"], "latency_n": stats["n"]}


async def _stream(engine: AsyncEngine, samples: Sequence[dict]) -> int:
    count = 0
    async for result in engine.score_stream(samples, "v"):
        if result.error:
            raise RuntimeError(result.error)
        count += 1
    return count


async def _poisson_latencies(engine: AsyncEngine, samples: Sequence[dict], rate: float,
                             seconds: float) -> list[float]:
    """Seconds from submission to result of samples arriving at ``rate`` per second (Poisson)
    for ``seconds``; arrival times are absolute, so late wake-ups do not lower the rate."""
    loop, rng = asyncio.get_running_loop(), np.random.default_rng(2)
    begin = at = loop.time()
    waits: list[asyncio.Task] = []
    while True:
        at += rng.exponential(1 / rate)
        if at - begin > seconds and waits:
            break
        await asyncio.sleep(max(0.0, at - loop.time()))
        waits.append(loop.create_task(_latency(engine, samples[len(waits) % len(samples)])))
    return list(await asyncio.gather(*waits))


async def _latency(engine: AsyncEngine, sample: dict) -> float:
    start = time.perf_counter()
    result = await engine.score(sample, "v")
    if result.error:
        raise RuntimeError(result.error)
    return time.perf_counter() - start


# ------------------------------------------------------------------ sections


def model_section(shape: Shape, plan: Plan, samples: int, latency_seconds: float, gemm: float,
                  deadline: float) -> dict:
    started = time.perf_counter()
    hf = build(shape, plan)
    model = load_model(hf, tokenizer=None, device=plan.device, dtype=plan.dtype)
    train = lognormal_samples(samples, 0, shape.vocab, plan.median, plan.clip)
    valuator = Valuator(model, progress=False, batch_tokens=plan.batch_tokens)
    # The first forwards: the packing probe (and flex's compilation), allocations.
    reference = valuator.reference(lognormal_samples(16, 1, shape.vocab, plan.median, plan.clip))
    valuator.score(train[:8], reference)
    warmup_s = time.perf_counter() - started
    rates, padded_tokens = passes_per_second(hf, model, valuator, reference, train, plan)
    # Ends before the deadline, so that a slow run still writes this section.
    latency_seconds = max(1.0, min(latency_seconds, deadline - time.monotonic() - 2 * plan.seconds - 5))
    served = asyncio.run(serving(model, reference, train, plan.seconds, latency_seconds))
    runner = ModelRunner(model, batch_tokens=plan.batch_tokens)  # the probe's result is cached
    tokens, flops = sum(len(s["input_ids"]) for s in train), model_flops(hf, train)
    return {
        "section": shape.name, "shape": dataclasses.asdict(shape), "device": plan.device,
        "dtype": str(plan.dtype), "attention": runner.attention, "why_not_packed": runner.why_not_packed,
        "samples": len(train), "tokens": tokens, "labels": sum(sum(s["loss_mask"][1:]) for s in train),
        "padded_tokens": padded_tokens, "warmup_s": warmup_s,
        "engine_tokens_per_s": rates["engine"] * tokens,
        "engine_samples_per_hour": rates["engine"] * len(train) * 3600,
        "hf_logits_tokens_per_s": rates["hf_logits"] * tokens,
        "hf_headless_tokens_per_s": rates["hf_headless"] * tokens,
        "vs_hf_logits": rates["engine"] / rates["hf_logits"],
        "vs_hf_headless": rates["engine"] / rates["hf_headless"],
        "gemm_tflops": gemm, **{f"{way}_mfu": rates[way] * flops[way] / 1e12 / gemm for way in rates},
        **served, "seconds": time.perf_counter() - started,
    }


def passes_per_second(hf: torch.nn.Module, model: ValuationModel, valuator: Valuator, reference: Reference,
                      train: Sequence[dict], plan: Plan) -> tuple[dict[str, float], int]:
    """Passes over ``train`` per second of the engine and of the Hugging Face forwards with
    logits and without the head; and the tokens of the padded batches."""
    seconds, passes = timed_passes(lambda: valuator.score(train, reference), plan.seconds, plan.device)
    rates = {"engine": passes / seconds}
    batches = padded_batches(train, plan)
    ways = {"hf_logits": lambda ids, mask: hf(input_ids=ids, attention_mask=mask, use_cache=False).logits,
            "hf_headless": model.hidden_states}
    with torch.inference_mode():
        for way, forward in ways.items():
            forward(*max(batches, key=lambda batch: batch[0].shape[1]))  # warm-up at the widest bucket
            seconds, passes = timed_passes(lambda f=forward: [f(ids, mask) for ids, mask in batches],
                                           plan.seconds, plan.device)
            rates[way] = passes / seconds
    return rates, sum(ids.numel() for ids, _ in batches)


def modes_section(shape: Shape, plan: Plan) -> dict:
    """The runner's packed attention modes side by side at this shape (forward only)."""
    model = load_model(build(shape, plan), tokenizer=None, device=plan.device, dtype=plan.dtype)
    samples = lognormal_samples(plan.samples[0] // 2, 3, shape.vocab, plan.median, plan.clip)
    return {"section": "attention-modes", "shape": shape.name,
            **compare_modes(model, samples, plan.batch_tokens, repeats=2)}


def table_line(result: dict) -> str:
    empty = " - |" * 9
    if "skipped" in result or "error" in result:
        return f"| {result['section']} | {result.get('skipped') or result['error']} |{empty}"
    if result["section"] == "attention-modes":
        modes = ", ".join(f"{mode} {r['tokens_per_s']:.0f}" if "tokens_per_s" in r else f"{mode} refused"
                          for mode, r in result["modes"].items())
        head = f"| attention modes at {result['shape']} | auto: {result['auto']} | {modes} (forward) |"
        return head + empty[4:]
    r = result
    cells = [r["section"], r["attention"], f"{r['engine_tokens_per_s']:.0f}",
             f"{r['engine_samples_per_hour']:.3g}", f"{r['hf_logits_tokens_per_s']:.0f}",
             f"{r['hf_headless_tokens_per_s']:.0f}",
             f"{r['vs_hf_logits']:.2f}", f"{r['vs_hf_headless']:.2f}", f"{r['engine_mfu']:.1%}",
             f"{r['latency_p50_ms']:.1f}", f"{r['latency_p99_ms']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def run_section(out: Path, name: str, work: Callable[[], dict], deadline: float, plan: Plan) -> None:
    """Run one section (or record why not) and write its JSON and table line at once."""
    left = deadline - time.monotonic()
    if left < plan.min_section_s:
        result = {"section": name, "skipped": f"out of time ({left:.0f} s left)"}
    else:
        try:
            result = work()
        except Exception as error:  # one failing section must not cost the others their run
            traceback.print_exc()
            result = {"section": name, "error": repr(error)[:500]}
        gc.collect()
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    (out / f"e2e-{name}.json").write_text(json.dumps(result, indent=1))
    line = table_line(result)
    with open(out / "e2e.md", "a") as table:
        table.write(line + "\n")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for e2e-*.json and e2e.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting sections after this")
    parser.add_argument("--sections", nargs="+", choices=[*(s.name for s in SHAPES), "attention-modes"],
                        help="only these sections (default: all, in order)")
    args = parser.parse_args(argv)
    wanted = set(args.sections or [*(s.name for s in SHAPES), "attention-modes"])
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    deadline = time.monotonic() + args.budget_s
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    shapes = [tiny(shape) for shape in SHAPES] if args.dry_run else list(SHAPES)
    gemm = gemm_tflops(plan)
    import transformers

    meta = {"machine": machine(), "gpu": torch.cuda.get_device_name() if plan.device == "cuda" else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "dry_run": args.dry_run,
            "dtype": str(plan.dtype), "gemm_tflops": gemm, "gemm_size": plan.gemm_size}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e-meta.json").write_text(json.dumps(meta, indent=1))
    (args.out / "e2e.md").write_text(f"{json.dumps(meta)}\n\n{TARGETS}\n\n{TABLE_HEAD}\n")
    print(json.dumps(meta), TABLE_HEAD, sep="\n", flush=True)
    for name, shape, samples, latency in zip([s.name for s in SHAPES], shapes, plan.samples,
                                             plan.latency_seconds, strict=True):
        if name in wanted:
            section = functools.partial(model_section, shape, plan, samples, latency, gemm, deadline)
            run_section(args.out, shape.name, section, deadline, plan)
    if "attention-modes" in wanted:
        run_section(args.out, "attention-modes", lambda: modes_section(shapes[0], plan), deadline, plan)
    print((args.out / "e2e.md").read_text())


if __name__ == "__main__":
    main()
