"""Sweep tile configurations of the softmax kernels on a GPU and report the fastest per shape.

    python -m forvalue.bench.perf.tune_kernels --out DIR [--dry-run]

Each candidate is checked against the torch twin before it is timed, so a configuration that
compiles wrongly (or spills into uselessness) shows up as WRONG or slow, never as a winner.
The winners are copied by hand into the ``KernelConfig`` tables of kernels/.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
from pathlib import Path

import torch

from forvalue import kernels
from forvalue.kernels import triton_utils

from .kernels import MODELS, make_inputs, op_call, rel_err, timed_ms

# The package exports the op functions under the modules' names, so import the modules by path.
lse_module = importlib.import_module("forvalue.kernels.vocab_logsumexp")
score_module = importlib.import_module("forvalue.kernels.reference_score")

TILES = {
    "vocab_logsumexp": [(128, 128, 64, 3), (128, 128, 64, 4), (256, 128, 32, 3), (256, 128, 64, 3),
                        (128, 256, 64, 3), (128, 128, 32, 4)],
    "reference_score": [(128, 64, 64, 3), (128, 64, 64, 4), (128, 128, 64, 3), (256, 64, 64, 3),
                        (128, 64, 32, 4), (256, 64, 32, 3)],
}
WAVES = (2, 4)
SHAPES = [("smollm2-135m", 4096), ("qwen2.5-1.5b", 4096), ("llama-3-8b", 4096), ("llama-3-8b", 16384)]
MODULES = {"vocab_logsumexp": (lse_module, "LSE_PARTIALS"),
           "reference_score": (score_module, "SCORE_PARTIALS")}


def use_config(op: str, tile: tuple[int, int, int, int], waves: int) -> None:
    module, name = MODULES[op]
    block_t, block_v, block_k, stages = tile
    current = getattr(module, name)
    gpu = dict(BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=8, num_stages=stages)
    setattr(module, name, type(current)(gpu=gpu, compact=current.compact, interpret=current.interpret))
    triton_utils._WAVES = waves


def sweep(shapes: list[tuple[str, int]], device: str, dtype: torch.dtype) -> list[dict]:
    rows = []
    for model, T in shapes:
        d, V = MODELS[model] if model in MODELS else (64, 500)
        x = make_inputs(T, V, d, dtype, device)
        for op, tiles in TILES.items():
            reference = op_call(op, x, "torch")()
            originals = {name: getattr(mod, name) for mod, name in MODULES.values()}
            for tile, waves in itertools.product(tiles, WAVES):
                use_config(op, tile, waves)
                call = op_call(op, x, "triton")
                try:
                    err = rel_err(call(), reference)
                    ms = timed_ms(call, device) if err < 1e-3 else None
                except Exception as error:  # a config that fails to compile is reported, not fatal
                    err, ms = None, None
                    print(f"{op} {tile} waves={waves}: {type(error).__name__}: {str(error)[:120]}")
                rows.append({"op": op, "model": model, "T": T, "tile": tile, "waves": waves,
                             "ms": ms, "rel_err": err})
                print(json.dumps(rows[-1]), flush=True)
            for mod, name in MODULES.values():
                setattr(mod, name, originals[name])
            triton_utils._WAVES = 4
        del x
    return rows


def best(rows: list[dict]) -> str:
    lines = ["| op | model | T | best tile (T,V,K,stages) | waves | ms | default ms |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["model"], r["T"]), []).append(r)
    for (op, model, T), group in groups.items():
        timed = [r for r in group if r["ms"] is not None]
        if not timed:
            continue
        win = min(timed, key=lambda r: r["ms"])
        default = next((r["ms"] for r in timed if r["tile"] == TILES[op][0] and r["waves"] == 4), None)
        lines.append(f"| {op} | {model} | {T} | {win['tile']} | {win['waves']} | {win['ms']:.3f} | "
                     f"{'-' if default is None else format(default, '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes in the interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        rows = sweep([("dry-run", 40)], "cpu", torch.float32)
    else:
        kernels.set_memory_budget(1 << 30)
        rows = sweep(SHAPES, "cuda", torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.json").write_text(json.dumps(rows, indent=1))
    table = best(rows)
    (args.out / "tune.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
