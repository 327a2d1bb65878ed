"""Where the engine's time goes on a GPU: profiles of one bulk pass and of single samples, and
compiled FlexAttention alone at each model shape's head layout.

bench/perf/gpu_e2e.py measures the engine against Hugging Face forwards; this says why it lands
where it does, for the next change to aim at:

- ``bulk``: one ``Valuator.score`` pass over log-normal samples (as gpu_e2e) under
  ``torch.profiler``: wall time, time the GPU was busy, and the top operators by device time
  and by host time;
- ``single``: ``Valuator.score`` of one sample at a time on an idle engine (latency p50/p99 and
  the top host operators): the floor under serving latency;
- ``flex``: compiled FlexAttention (dynamic shapes, document block mask, grouped-query heads)
  on random inputs with each shape's heads, in SHAPES order in one process (as the engine
  meets them), with the full error where it fails.

    bench/gpu_check.sh DIR --profile [--dry-run]
    python -m forvalue.bench.perf.gpu_profile --out DIR [--dry-run] [--shape qwen2.5-1.5b] [--flex-only]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from forvalue.engine import Valuator, load_model

from ..common import percentiles
from .attention_modes import lognormal_samples
from .gpu_e2e import DRY_PLAN, GPU_PLAN, SHAPES, Plan, Shape, build, synchronize, tiny

TOP = 25


def _activities(plan: Plan) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device == "cuda" else [])


def _device_seconds(prof: profile) -> float:
    """Seconds of device kernels: the device's own events only (the operators that launched
    them carry the same time, and counting both would double it)."""
    return sum(event.self_device_time_total for event in prof.events()
               if event.device_type == DeviceType.CUDA) / 1e6


def profile_engine(shape: Shape, plan: Plan, samples: int) -> tuple[dict, str]:
    hf = build(shape, plan)
    model = load_model(hf, tokenizer=None, device=plan.device, dtype=plan.dtype)
    train = lognormal_samples(samples, 0, shape.vocab, plan.median, plan.clip)
    valuator = Valuator(model, progress=False, batch_tokens=plan.batch_tokens)
    reference = valuator.reference(lognormal_samples(16, 1, shape.vocab, plan.median, plan.clip))
    valuator.score(train, reference)  # compilations and allocations out of the numbers
    synchronize(plan.device)
    with profile(activities=_activities(plan)) as prof:
        start = time.perf_counter()
        valuator.score(train, reference)
        synchronize(plan.device)
        wall = time.perf_counter() - start
    device_s = _device_seconds(prof)
    sort_device = "self_device_time_total" if plan.device == "cuda" else "self_cpu_time_total"
    text = [f"# bulk: {shape.name}, {len(train)} samples, wall {wall:.3f} s, device busy {device_s:.3f} s",
            prof.key_averages().table(sort_by=sort_device, row_limit=TOP),
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP)]

    latencies = []
    for sample in train[:40]:
        start = time.perf_counter()
        valuator.score([sample], reference)
        synchronize(plan.device)
        latencies.append(time.perf_counter() - start)
    with profile(activities=_activities(plan)) as prof:
        for sample in train[40:50]:
            valuator.score([sample], reference)
        synchronize(plan.device)
    stats, busy = percentiles(latencies[5:]), _device_seconds(prof)
    text += [f"# single: {shape.name}, one sample per call, p50 {1e3 * stats['p50']:.1f} ms, "
             f"p99 {1e3 * stats['p99']:.1f} ms; profile of 10 calls, device busy {busy:.3f} s",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP)]
    tokens = sum(len(s["input_ids"]) for s in train)
    result = {"section": "profile", "shape": shape.name, "samples": len(train), "tokens": tokens,
              "wall_s": wall, "device_busy_s": device_s, "device_busy_share": device_s / wall,
              "tokens_per_s": tokens / wall, "single_p50_ms": 1e3 * stats["p50"],
              "single_p99_ms": 1e3 * stats["p99"]}
    return result, "\n\n".join(text)


def flex_alone(shapes: list[Shape], plan: Plan) -> list[dict]:
    """Compiled (dynamic) FlexAttention with a document block mask at each shape's heads."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled_flex = torch.compile(flex_attention, dynamic=True)
    compiled_mask = torch.compile(create_block_mask, dynamic=True)
    results = []
    for shape in shapes:
        head_dim = shape.hidden // shape.heads
        # Short rows (the engine's packing probe) and two long ones (the second must not
        # recompile).
        for length in (40, 200, 3000, 3900):
            lengths = np.random.default_rng(length).integers(8 if length < 1000 else 32, 1024, 16).cumsum()
            segment = torch.bucketize(torch.arange(length, device=plan.device),
                                      torch.tensor(lengths, device=plan.device), right=True)

            def mask_mod(b, h, q, k, segment=segment):
                return (segment[q] == segment[k]) & (k <= q)

            q = torch.randn(1, shape.heads, length, head_dim, device=plan.device, dtype=plan.dtype)
            k, v = (torch.randn(1, shape.kv_heads, length, head_dim, device=plan.device, dtype=plan.dtype)
                    for _ in range(2))
            entry = {"shape": shape.name, "heads": shape.heads, "kv_heads": shape.kv_heads,
                     "head_dim": head_dim, "length": length}
            try:
                start = time.perf_counter()
                mask = compiled_mask(mask_mod, 1, None, length, length, device=plan.device)
                out = compiled_flex(q, k, v, block_mask=mask, scale=head_dim**-0.5,
                                    enable_gqa=shape.heads != shape.kv_heads)
                synchronize(plan.device)
                entry["first_call_s"] = time.perf_counter() - start
                expected = flex_attention(q.float(), k.float(), v.float(), block_mask=mask,
                                          scale=head_dim**-0.5, enable_gqa=shape.heads != shape.kv_heads)
                entry["relative_error"] = float((out.float() - expected).norm() / expected.norm())
            except Exception as error:
                entry["error"] = "".join(traceback.format_exception(error))[-4000:]
            results.append(entry)
            print(json.dumps({key: value for key, value in entry.items() if key != "error"}),
                  entry.get("error", "")[-600:], flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for profile.txt and profile.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds")
    parser.add_argument("--shape", default=SHAPES[0].name, choices=[s.name for s in SHAPES],
                        help="the shape profiled")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--flex-only", action="store_true", help="only compiled FlexAttention alone")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    shapes = [tiny(shape) for shape in SHAPES] if args.dry_run else list(SHAPES)
    args.out.mkdir(parents=True, exist_ok=True)
    flex = flex_alone(shapes, plan) if plan.device == "cuda" else []
    if args.flex_only:
        (args.out / "flex.json").write_text(json.dumps(flex, indent=1))
        return
    shape = shapes[[s.name for s in SHAPES].index(args.shape)]
    result, text = profile_engine(shape, plan, 64 if args.dry_run else args.samples)
    (args.out / "profile.txt").write_text(text)
    (args.out / "profile.json").write_text(json.dumps({**result, "flex": flex}, indent=1))
    print(text[-6000:])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
