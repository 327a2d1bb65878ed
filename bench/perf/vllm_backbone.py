"""The vLLM backbone against the native one, side by side in one run (CPU here; the same
script on a GPU machine with vLLM).

Workload: the throughput benchmark's samples (log-normal lengths, median 128 tokens, the last
two thirds labelled), valued against a reference of 8 others with select's default options
and with the paper's value. Per backbone: time to load, time to value, samples/s and tokens/s,
and the largest difference of the values relative to the largest value. For vLLM also what
its calls cost beyond the model's forwards (timed by hooks in its worker): scheduling, pooling
and bringing the ``T x d`` states back to this process.

The native backbone runs first, then vLLM is started (an idle vLLM engine process would share
the cores with the native run).

    python -m forvalue.bench.perf.vllm_backbone --out bench/results --samples 64
    bench/gpu_check.sh DIR --vllm      # on a CUDA machine with vLLM: tensor parallel over its GPUs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from forvalue.engine import Valuator, load_model
from forvalue.engine.model.vllm_backbone import VllmOptions

from ..common import load_average, machine
from .throughput import make_samples, num_tokens

CONFIGS = {"select's default": {"precondition": "input", "normalize": "cosine", "skip_depth": 0.75},
           "paper's value": {"precondition": None, "normalize": "none", "skip_depth": None}}


def value_all(model, train: list[dict], valid: list[dict]) -> dict[str, dict]:
    results = {}
    for name, config in CONFIGS.items():
        valuator = Valuator(model, **config)
        valuator.score(train[:4], valuator.reference(valid))  # warm-up: first-call costs
        start = time.perf_counter()
        values = valuator.score(train, valuator.reference(valid))
        seconds = time.perf_counter() - start
        results[name] = {"seconds": seconds, "values": np.asarray(values, dtype=np.float64)}
    return results


class _ForwardClock:
    """In vLLM's worker: time spent inside the model's forward (``start``: install, reset;
    else read the seconds so far)."""

    def __init__(self, start: bool) -> None:
        self.start = start

    def __call__(self, model: torch.nn.Module) -> float:
        if not self.start:
            return model._forvalue_clock[0]
        for handle in getattr(model, "_forvalue_clock_hooks", ()):
            handle.remove()
        clock = model._forvalue_clock = [0.0, 0.0]

        def synchronize() -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def before(*_: object) -> None:
            synchronize()
            clock[1] = time.perf_counter()

        def after(*_: object) -> None:
            synchronize()
            clock[0] += time.perf_counter() - clock[1]

        model._forvalue_clock_hooks = (model.register_forward_pre_hook(before),
                                       model.register_forward_hook(after))
        return 0.0


def overhead(model, train: list[dict]) -> dict[str, float]:
    """One ``states`` call over every sample: its seconds, those of the model's forwards inside
    vLLM's worker, and the bytes of states returned. The difference is everything else
    (scheduling, pooling, bringing the states back): an upper bound on the cost of the move."""
    ids = [s["input_ids"] for s in train]
    model.vllm.states(ids[:2])
    model.vllm.llm.apply_model(_ForwardClock(start=True))
    start = time.perf_counter()
    states = model.vllm.states(ids)
    seconds = time.perf_counter() - start
    forward = model.vllm.llm.apply_model(_ForwardClock(start=False))[0]
    moved = sum(h.numel() * h.element_size() for h in states)
    return {"states_seconds": seconds, "forward_seconds": forward, "bytes_returned": moved,
            "overhead_share": (seconds - forward) / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for vllm-backbone.json and .md")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs vLLM splits the model over")
    args = parser.parse_args(argv)
    load_before = load_average()
    rows = {}
    start = time.perf_counter()
    native = load_model(args.model)
    loads = {"hf": time.perf_counter() - start}
    vocab = len(native.tokenizer) if native.tokenizer is not None else native.vocab_size
    train = make_samples(args.samples, 0, vocab, "t")
    valid = make_samples(8, 1, vocab, "v")
    rows["hf"] = value_all(native, train, valid)
    del native
    start = time.perf_counter()
    model = load_model(args.model, backbone="vllm",
                       vllm_options=VllmOptions(tensor_parallel_size=args.tensor_parallel_size))
    loads["vllm"] = time.perf_counter() - start
    try:
        rows["vllm"] = value_all(model, train, valid)
        transfer = overhead(model, train)
    finally:
        model.vllm.close()
    tokens = num_tokens(train)
    table = []
    for name in CONFIGS:
        reference = rows["hf"][name]["values"]
        for backbone in ("hf", "vllm"):
            run = rows[backbone][name]
            difference = float(np.abs(run["values"] - reference).max() / np.abs(reference).max())
            seconds = run["seconds"]
            table.append({"backbone": backbone, "options": name, "seconds": seconds,
                          "samples_per_s": len(train) / seconds, "tokens_per_s": tokens / seconds,
                          "max_relative_difference": difference})
    command = " ".join(sys.argv[1:] if argv is None else argv)
    result = {"machine": machine(), "load_average_before": load_before, "load_average_after": load_average(),
              "command": f"python -m forvalue.bench.perf.vllm_backbone {command}",
              "samples": len(train), "tokens": tokens, "load_seconds": loads, "rows": table,
              "vllm_states": transfer, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm-backbone.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
