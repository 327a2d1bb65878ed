"""FLOPs per training sample of each valuation method at a model shape, counted, not timed.

For-Value is one forward pass; the gradient methods it is compared with train a warm-up
adapter, then take a forward and a backward pass per sample and checkpoint. This counts the
matrix products of each (the ``2 m n k`` of every GEMM; norms, softmax and elementwise work
left out) for one sample of ``T`` tokens of which ``L`` are labels:

- **backbone**: ``2 N T`` for the ``N`` weights of the decoder layers, plus causal attention
  ``2 T^2 d`` per layer; **head**: ``2 V d`` per label (the logits; For-Value's kernels
  compute them block by block, never stored);
- **paper's value** against a reference: the reference-score kernel's further ``2 V d`` per
  label (``e_t^T Gbar h_t``);
- **select's default** (precondition, cosine, skip readout): the states are ``2d`` wide, so
  the score is ``2 V 2d`` per label; whitening ``2 (2d)^2`` per label; the cosine's squared
  norm the error gram ``2 L^2 V`` and the state gram ``2 L^2 2d``; the validation side is built
  once and left out;
- **LoRA training step** (warm-up): forward, then the backward pass's activation gradients
  (``2 N T``, the attention's twice its forward, the head's ``2 V d`` per label) and the
  adapters' weight gradients (``4 r (d_in + d_out)`` per token and adapted matrix);
- **LESS** as its paper runs it: a warm-up on 5% of the pool for 4 epochs (amortised over
  the pool), then at each of 4 checkpoints a forward and backward pass and a dense random
  projection of the adapter gradient (``p`` values) to 8192 dimensions (``2 p 8192``);
  rank 128 on the attention projections. ``LESS as bench/evals runs it``: rank 8 on every
  linear layer, one epoch of warm-up on the whole pool, one checkpoint, no projection.
- **select's default, cold + warm** (``-cold-plus-warm`` in ``forvalue eval``): that warm-up
  epoch on the whole pool, then select's default on the base model and on the warmed one.

    python -m forvalue.bench.perf.method_cost --out bench/results/method-cost.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .gpu_e2e import SHAPES, Shape

PROJECTION = 8192


@dataclass(frozen=True)
class Lora:
    rank: int
    targets: tuple[str, ...]  # of "q", "k", "v", "o", "gate", "up", "down"
    warmup_share: float  # of the pool, per epoch
    warmup_epochs: int
    checkpoints: int
    projection: int  # 0: none


LESS_PAPER = Lora(128, ("q", "k", "v", "o"), 0.05, 4, 4, PROJECTION)
LESS_HERE = Lora(8, ("q", "k", "v", "o", "gate", "up", "down"), 1.0, 1, 1, 0)


def matrices(shape: Shape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear map of a decoder layer."""
    kv = shape.kv_heads * shape.hidden // shape.heads
    d, i = shape.hidden, shape.intermediate
    return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d),
            "gate": (d, i), "up": (d, i), "down": (i, d)}


def forward(shape: Shape, tokens: int, labels: int) -> float:
    weights = sum(a * b for a, b in matrices(shape).values()) * shape.layers
    attention = 2 * tokens**2 * shape.hidden * shape.layers
    return 2 * weights * tokens + attention + 2 * shape.vocab * shape.hidden * labels


def adapter_size(shape: Shape, lora: Lora) -> int:
    per_layer = sum(a + b for name, (a, b) in matrices(shape).items() if name in lora.targets)
    return lora.rank * per_layer * shape.layers


def lora_step(shape: Shape, lora: Lora, tokens: int, labels: int) -> float:
    """Forward and backward of a LoRA-adapted model on one sample."""
    return 2 * forward(shape, tokens, labels) + 4 * adapter_size(shape, lora) * tokens


def warm_up(shape: Shape, lora: Lora, tokens: int, labels: int) -> float:
    """The warm-up's training steps, amortised over the pool: per sample of the pool."""
    return lora.warmup_share * lora.warmup_epochs * lora_step(shape, lora, tokens, labels)


def less(shape: Shape, lora: Lora, tokens: int, labels: int) -> dict[str, float]:
    step = lora_step(shape, lora, tokens, labels)
    return {"warm-up": warm_up(shape, lora, tokens, labels),
            "gradients": lora.checkpoints * step,
            "projection": lora.checkpoints * 2 * adapter_size(shape, lora) * lora.projection}


def paper_value(shape: Shape, tokens: int, labels: int) -> dict[str, float]:
    return {"forward": forward(shape, tokens, labels), "score": 2 * shape.vocab * shape.hidden * labels}


def select_default(shape: Shape, tokens: int, labels: int) -> dict[str, float]:
    width = 2 * shape.hidden
    return {"forward": forward(shape, tokens, labels), "score": 2 * shape.vocab * width * labels,
            "whitening": 2 * width**2 * labels,
            "cosine": 2 * labels**2 * (shape.vocab + width)}


def cold_plus_warm(shape: Shape, lora: Lora, tokens: int, labels: int) -> dict[str, float]:
    value = sum(select_default(shape, tokens, labels).values())
    return {"warm-up": warm_up(shape, lora, tokens, labels), "two values": 2 * value}


def table(shape: Shape, tokens: int, labels: int) -> dict[str, dict[str, float]]:
    methods = {"paper's value": paper_value(shape, tokens, labels),
               "select's default": select_default(shape, tokens, labels),
               "LESS (paper's setup)": less(shape, LESS_PAPER, tokens, labels),
               "LESS (as bench/evals runs it)": less(shape, LESS_HERE, tokens, labels),
               "select's default, cold + warm": cold_plus_warm(shape, LESS_HERE, tokens, labels)}
    return {name: {**parts, "total": sum(parts.values())} for name, parts in methods.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forvalue.bench.perf.method_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=SHAPES[0].name, choices=[s.name for s in SHAPES])
    parser.add_argument("--tokens", type=int, default=256,
                        help="tokens per sample (the GPU bench's median)")
    parser.add_argument("--labels", type=int, default=171,
                        help="label tokens per sample (its last two thirds)")
    parser.add_argument("--out", help="write the table as JSON here too")
    args = parser.parse_args(argv)
    shape = next(s for s in SHAPES if s.name == args.shape)
    costs = table(shape, args.tokens, args.labels)
    default = costs["select's default"]["total"]
    print(f"{shape.name}, {args.tokens} tokens, {args.labels} labels: GFLOP per sample")
    for name, parts in costs.items():
        detail = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items() if k != "total")
        ratio = default / parts["total"]
        print(f"  {name:32s} {parts['total'] / 1e9:9.1f}  default/this {ratio:.3f}  ({detail})")
    if args.out:
        gflop = {n: {k: v / 1e9 for k, v in p.items()} for n, p in costs.items()}
        record = {"shape": asdict(shape), "tokens": args.tokens, "labels": args.labels,
                  "less_paper": asdict(LESS_PAPER), "less_here": asdict(LESS_HERE), "gflop": gflop}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
