"""How far the index's values are from the exact ones, gated on ``forvalue select``'s default
(A from the target, cosine, the skip readout): per task and seed, the task's metric of the exact
values and of the index's (built with ``--sketch-rows K``), side by side in one run.

Identification tasks are measured on pairwise values (one column per validation sample), the
others on values against the validation set. Run (one JSON row per task and seed, then a table):

    python -m forvalue.bench.evals.index_fidelity --tasks demo,mislabeled --seeds 0,1,2,3,4 \
        --out bench/results/index/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from forvalue.bench.common import load_average, machine
from forvalue.bindings.cli.demo import make_task as make_demo_task
from forvalue.engine import Index, ValuationConfig, Valuator, load_model
from forvalue.engine.index.layout import SKETCH_ROWS
from forvalue.engine.valuation.ranking import roc_auc

from .eval import score_values
from .tasks import TASKS, make_task


def task_and_metric(name: str, size: str, seed: int):
    """Training and validation samples, the label rule, whether values are pairwise, and the
    task's metric of them."""
    if name == "demo":
        demo = make_demo_task(seed)
        return demo.train, demo.valid, "response", False, lambda v: roc_auc(-v[:, 0], demo.mislabelled)
    task = make_task(name, size, seed)
    pairwise = task.kind == "identification"
    return task.train, task.valid, task.loss_on, pairwise, \
        lambda v: score_values(task, v if pairwise else v[:, 0])["auc_mean"]


SELECT_RATIO = 0.2  # the budget the shortlist routes are compared at
SHORTLISTS = (0, 1, 3)  # multiples of the budget valued exactly (0: the coarse estimates alone)


def coarse_routes(index: Index, valid: list[dict], columns: str, metric) -> dict:
    """The fast routes against the index's exact scan: the metric of the coarse estimates
    (select's ``--shortlist 0`` values) and, per shortlist, the share of exact select's choice
    at ``SELECT_RATIO`` that the shortlisted select keeps."""
    estimates = index.values(valid, columns=columns, shortlist=0).values
    strategy = "top" if columns == "mean" else "round-robin"
    exact = set(index.select(valid, SELECT_RATIO, strategy=strategy))
    kept = {str(m): len(exact & set(index.select(valid, SELECT_RATIO, strategy=strategy, shortlist=m)))
            / len(exact) for m in SHORTLISTS}
    return {"coarse": metric(estimates), "select_kept": kept}


def measure(model, name: str, size: str, seed: int, rows: int, storage: str, coarse: bool,
            merges: list[int | None]) -> list[dict]:
    """One row per ``max_tokens`` of ``merges`` (None: every token kept), the exact values
    computed once."""
    train, valid, loss_on, pairwise, metric = task_and_metric(name, size, seed)
    config = ValuationConfig.for_command("select", loss_on=loss_on)
    started = time.perf_counter()
    valuator = Valuator(model, config=config, progress=False)
    if pairwise:
        exact = valuator.pairwise(train, valid)
    else:
        exact = valuator.score(train, valuator.reference(valid))[:, None]
    exact_seconds = time.perf_counter() - started
    found = []
    for max_tokens in merges:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            index = Index.build(train, folder, model=model, config=config, sketch_rows=rows, seed=seed,
                                storage=storage, max_tokens=max_tokens, progress=False)
            built = time.perf_counter()
            columns = "each" if pairwise else "mean"
            stored = index.values(valid, columns=columns).values
            info = index.info()
            queried = time.perf_counter()
            routes = coarse_routes(index, valid, columns, metric) if coarse else {}
        found.append({"task": name, "size": size, "seed": seed, "rows": rows, "storage": storage,
                      "max_tokens": max_tokens, "merged_samples": info.get("merged_samples", 0),
                      "exact": metric(exact), "index": metric(stored), **routes,
                      "corr": float(np.corrcoef(exact.ravel(), stored.ravel())[0, 1]),
                      "bytes_per_sample": info["bytes_per_sample"],
                      "seconds": {"exact": exact_seconds, "build": built - started,
                                  "query": queried - built}})
    return found


def coarse_table(rows: list[dict]) -> str:
    header = " | ".join(f"kept at --shortlist {m}" for m in SHORTLISTS)
    lines = [f"| task | exact, mean | coarse, mean | exact - coarse: mean | worst | {header} |",
             "|---|---|---|---|---|" + "---|" * len(SHORTLISTS)]
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == name]
        gaps = np.array([r["exact"] - r["coarse"] for r in mine])
        kept = " | ".join(f"{np.mean([r['select_kept'][str(m)] for r in mine]):.3f}" for m in SHORTLISTS)
        lines.append(f"| {name} | {np.mean([r['exact'] for r in mine]):.4f} | "
                     f"{np.mean([r['coarse'] for r in mine]):.4f} | {gaps.mean():+.4f} | "
                     f"{gaps[np.argmax(np.abs(gaps))]:+.4f} | {kept} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| task | max tokens | exact, mean | index, mean | exact - index: mean | worst | min corr | "
             "KiB/sample |", "|---|---|---|---|---|---|---|---|"]
    for name, merge in dict.fromkeys((r["task"], r.get("max_tokens")) for r in rows):
        mine = [r for r in rows if r["task"] == name and r.get("max_tokens") == merge]
        gaps = np.array([r["exact"] - r["index"] for r in mine])
        lines.append(f"| {name} | {merge or 'all'} | {np.mean([r['exact'] for r in mine]):.4f} | "
                     f"{np.mean([r['index'] for r in mine]):.4f} | {gaps.mean():+.4f} | "
                     f"{gaps[np.argmax(np.abs(gaps))]:+.4f} | {min(r['corr'] for r in mine):.4f} | "
                     f"{np.mean([r['bytes_per_sample'] for r in mine]) / 1024:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(("demo", *TASKS)))
    parser.add_argument("--size", default="small", help="size of the forvalue eval tasks")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rows", type=int, default=SKETCH_ROWS, help="sketch rows k")
    parser.add_argument("--storage", default="bfloat16")
    parser.add_argument("--max-tokens", default="none",
                        help="comma-separated max_tokens of the indexes compared (none: all kept)")
    parser.add_argument("--coarse", action="store_true",
                        help="also measure select's fast routes (the coarse estimates, shortlists)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    merges = [None if m == "none" else int(m) for m in args.max_tokens.split(",")]
    started, rows = time.perf_counter(), []
    for name in args.tasks.split(","):
        for seed in map(int, args.seeds.split(",")):
            for row in measure(model, name, args.size, seed, args.rows, args.storage, args.coarse, merges):
                rows.append(row)
                print(json.dumps(row), flush=True)
    command = (f"python -m forvalue.bench.evals.index_fidelity --tasks {args.tasks} --size {args.size} "
               f"--seeds {args.seeds} --rows {args.rows} --storage {args.storage} "
               f"--max-tokens {args.max_tokens}" + (" --coarse" if args.coarse else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "load_average_after": load_average(),
                                    "seconds": time.perf_counter() - started, "command": command,
                                    "rows": rows}, indent=1) + "\n")
    print(table(rows))
    if args.coarse:
        print(coarse_table(rows))


if __name__ == "__main__":
    main()
