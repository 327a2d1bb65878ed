"""Core valuation benchmarks on the embedded model (CPU): overhead over a plain forward, the
naive full-logit way, and the two exact pairwise routes.

    python -m forvalue.bench.perf.core --out DIR [--samples 100]

(a) Valuation throughput against a plain hidden-state forward over the same tokens, both on
    length-sorted padded batches of 8 (valuation = that forward + label gather + kernels).
(b) Time and peak memory against the naive way of the official code (full fp32 logits per
    batch and a ``V x d`` matrix per sample), checking that both give the same values.
(c) Pairwise: time of the token-gram route and of the build-``G(b)`` route as the validation
    sample grows, with the route "auto" picks.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forvalue import kernels
from forvalue.engine import Valuator, load_model
from forvalue.engine.core.runner import right_padded
from forvalue.engine.valuation.label_math import gram_is_cheaper

from ..common import machine

BATCH = 8


def synthetic_samples(tokenizer: Any, n: int, seed: int) -> list[dict]:
    """Pre-tokenised windows of real text, 16-400 tokens, the last two thirds labelled."""
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text() * 4
    ids = tokenizer(text)["input_ids"]
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(rng.integers(16, 401))
        start = int(rng.integers(0, len(ids) - length))
        window = ids[start:start + length]
        mask = [0] * (length - 2 * length // 3) + [1] * (2 * length // 3)
        samples.append({"id": f"s{i}", "input_ids": window, "loss_mask": mask})
    return samples


class PeakRss:
    """Peak resident memory above the level at entry, sampled every 2 ms in a thread."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def padded_batches(samples: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    ordered = sorted(samples, key=lambda s: -len(s["input_ids"]))
    batches = []
    for start in range(0, len(ordered), BATCH):
        group = ordered[start:start + BATCH]
        batches.append((*right_padded([s["input_ids"] for s in group]), group))
    return batches


def label_rows(hidden: torch.Tensor, group: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Hidden states predicting each label and the labels, stacked over the batch."""
    states, labels, sizes = [], [], []
    for row, s in enumerate(group):
        positions = [k for k, m in enumerate(s["loss_mask"]) if m and k > 0]
        states.append(hidden[row, [k - 1 for k in positions]])
        labels.append(torch.tensor([s["input_ids"][k] for k in positions]))
        sizes.append(len(positions))
    return torch.cat(states), torch.cat(labels), sizes


def forward_only(model: Any, batches: list) -> None:
    for ids, mask, _ in batches:
        model.hidden_states(ids, mask)


def forward_and_value(model: Any, batches: list, gradient: torch.Tensor) -> dict[str, float]:
    values = {}
    for ids, mask, group in batches:
        hidden, labels, sizes = label_rows(model.hidden_states(ids, mask), group)
        scores = kernels.reference_score(hidden, model.head_weight, labels, gradient,
                                         **model.transform.kwargs())
        for s, part in zip(group, scores.split(sizes), strict=True):
            values[s["id"]] = float(part.sum())
    return values


def naive_values(model: Any, batches: list, gradient: torch.Tensor) -> dict[str, float]:
    """The official code's way: full fp32 logits per batch, a ``V x d`` matrix per sample."""
    values = {}
    for ids, mask, group in batches:
        hidden = model.hidden_states(ids, mask)
        for row, s in enumerate(group):
            positions = [k - 1 for k, m in enumerate(s["loss_mask"]) if m and k > 0]
            h = hidden[row, positions].float()
            probs = torch.softmax(h @ model.head_weight.float().T, dim=-1)  # T x V
            probs[torch.arange(len(positions)), ids[row, [p + 1 for p in positions]]] -= 1.0
            per_sample = -(probs.T @ h)  # V x d, the sample's G
            values[s["id"]] = float((per_sample * gradient).sum())
    return values


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    with PeakRss() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem.extra_mb


def part_a_b(model: Any, train: list[dict], valid: list[dict]) -> dict[str, Any]:
    valuator = Valuator(model, progress=False)
    reference = valuator.reference(valid)
    gradient = reference.mean().float()
    batches = padded_batches(train)
    tokens = sum(len(s["input_ids"]) for s in train)
    forward_only(model, batches[:1])  # warm-up
    _, t_forward, m_forward = timed(lambda: forward_only(model, batches))
    ours, t_value, m_value = timed(lambda: forward_and_value(model, batches, gradient))
    naive, t_naive, m_naive = timed(lambda: naive_values(model, batches, gradient))
    engine, t_engine, m_engine = timed(lambda: valuator.score(train, reference))
    a = np.array([ours[s["id"]] for s in train])
    b = np.array([naive[s["id"]] for s in train])
    return {
        "tokens": tokens,
        "forward": {"seconds": t_forward, "tokens_per_s": tokens / t_forward, "extra_mb": m_forward},
        "forvalue": {"seconds": t_value, "tokens_per_s": tokens / t_value, "extra_mb": m_value},
        "naive": {"seconds": t_naive, "tokens_per_s": tokens / t_naive, "extra_mb": m_naive},
        "valuator_score": {"seconds": t_engine, "tokens_per_s": tokens / t_engine, "extra_mb": m_engine},
        "throughput_ratio": t_forward / t_value,
        "naive_max_rel_diff": float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
        "valuator_max_rel_diff": float(np.max(np.abs(engine - a)) / np.max(np.abs(a))),
    }


def part_c(model: Any, train: list[dict], valid_lengths: list[int], n_valid: int = 8) -> list[dict[str, Any]]:
    """Both exact routes for ``n_valid`` validation samples of each length against the training
    set, as Valuator.pairwise runs them: one token gram for all of them, or ``G(b)`` built and
    scored against once per sample."""
    W, kw = model.head_weight, model.transform.kwargs()
    batches = padded_batches(train)
    rows = [label_rows(model.hidden_states(ids, mask), group)[:2] for ids, mask, group in batches]
    H_A, y_A = torch.cat([h for h, _ in rows]), torch.cat([y for _, y in rows])
    out = []
    for Tb in [t for t in valid_lengths if t * n_valid <= len(y_A)]:
        H_B, y_B = H_A[:Tb * n_valid], y_A[:Tb * n_valid]
        g, t_gram, _ = timed(lambda H_B=H_B, y_B=y_B: _gram_route(H_A, y_A, H_B, y_B, W, kw))
        o, t_outer, _ = timed(lambda Tb=Tb: sum(
            _outer_route(H_A, y_A, H_A[j * Tb:(j + 1) * Tb], y_A[j * Tb:(j + 1) * Tb], W, kw)
            for j in range(n_valid)))
        auto = "gram" if gram_is_cheaper(len(y_A), Tb, model.hidden_size) else "outer"
        out.append({"train_tokens": len(y_A), "valid_samples": n_valid, "valid_tokens": Tb,
                    "gram_s": t_gram, "outer_s": t_outer,
                    "faster": "gram" if t_gram < t_outer else "outer", "auto": auto,
                    "max_rel_diff": float((g - o).abs().max() / o.abs().max())})
    return out


def _gram_route(H_A: torch.Tensor, y_A: torch.Tensor, H_b: torch.Tensor, y_b: torch.Tensor,
                W: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    return (kernels.error_gram(H_A, y_A, H_b, y_b, W, **kw) * (H_A @ H_b.T)).sum(1)


def _outer_route(H_A: torch.Tensor, y_A: torch.Tensor, H_b: torch.Tensor, y_b: torch.Tensor,
                 W: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    return kernels.reference_score(H_A, W, y_A, kernels.error_outer(H_b, W, y_b, **kw), **kw)


def markdown(result: dict[str, Any]) -> str:
    ab = result["a_b"]
    lines = ["| method | seconds | tokens/s | extra peak MiB |", "|---|---:|---:|---:|"]
    names = {"forward": "plain hidden-state forward (batches of 8)",
             "forvalue": "forward + For-Value (reference_score)",
             "naive": "naive: full logits + V x d per sample",
             "valuator_score": "Valuator.score (engine path: packed steps)"}
    for key, name in names.items():
        r = ab[key]
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['extra_mb']:.0f} |")
    lines += ["", f"Valuation throughput / plain forward: **{ab['throughput_ratio']:.2f}** "
              f"(target >= 0.75). Naive vs For-Value values: max relative difference "
              f"{ab['naive_max_rel_diff']:.1e}; Valuator vs the batches-of-8 path "
              f"{ab['valuator_max_rel_diff']:.1e}.", "",
              "| train tokens | valid samples x tokens | gram route s | outer route s | faster | "
              "auto picks | max rel diff |", "|---:|---:|---:|---:|---|---|---:|"]
    for r in result["c"]:
        lines.append(f"| {r['train_tokens']} | {r['valid_samples']} x {r['valid_tokens']} | "
                     f"{r['gram_s']:.2f} | {r['outer_s']:.2f} | {r['faster']} | {r['auto']} | "
                     f"{r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (one steadies timings on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model)
    train = synthetic_samples(model.tokenizer, args.samples, seed=0)
    valid = synthetic_samples(model.tokenizer, 8, seed=1)
    result = {"machine": machine(),
              "load_average": os.getloadavg(), "samples": args.samples,
              "a_b": part_a_b(model, train, valid),
              "c": part_c(model, train[:24], [16, 64, 256])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "core.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "core.md").write_text(table + "\n")
    print(json.dumps({k: result[k] for k in ("machine", "load_average", "samples")}))
    print(table)


if __name__ == "__main__":
    main()
