"""Which stored form of a training sample's gradient keeps ``forvalue select``'s default value
when the target (validation set, and so the preconditioner) is only known at query time: the
measurement behind the index's layout (not a method of the package).

``select``'s default whitens with ``A`` from the target, so the hidden side of ``G(a)`` (``D =
2d`` with the skip readout) cannot be compressed at build time; the vocabulary side can (a
sketch ``R`` of ``V x k``, entries N(0, 1/k), commutes with ``P``). Two layouts are compared
with the exact value on the demo task (seeds given), by the AUC of the mislabelled answers and
the correlation with the exact values:

- ``matrix-k``: ``S(a) = R^T G(a)`` (``k x D`` per sample): query ``<S(a) P, Sbar>``.
- ``tokens-k``: each label token's state ``h_t`` kept whole and its error sketched, ``R^T e_t``
  (``T x (D + k)`` per sample): the same estimate, but ``k`` can be large since nothing of size
  ``k x D`` is stored.

Both compute the same estimate of ``<G(a) P, G(b)>`` (without bias; cosine norms from the same
sketch) for a given ``k``: they differ in what is stored, so the fidelity is measured per ``k``
and the bytes per sample of each layout reported beside it. ``--task`` takes the demo task or
a ``forvalue eval`` task valued against its validation set (mislabeled, selection), with that
task's metric. Run:

    python bench/experiments/index_layouts.py --task demo --seeds 0,1,2,3,4 --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from forvalue import kernels
from forvalue.bench.common import machine
from forvalue.bench.evals.eval import score_values
from forvalue.bench.evals.tasks import make_task as make_eval_task
from forvalue.bindings.cli.demo import make_task as make_demo_task
from forvalue.engine import Valuator, load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.valuation.precondition import MomentAccumulator, Preconditioner
from forvalue.engine.valuation.ranking import roc_auc

SKETCH_ROWS = (16, 64, 256, 1024, 4096)


def sketched_values(train, valid, head, pre, k, seed):
    """Cosine values against the validation set from sketched errors and whitened states."""
    R = torch.randn(head.shape[0], k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5

    def sketch(states):  # k x D: sum_t (R^T e_t) (C^-1 h_t)^T
        errors = kernels.error_sketch(states.hidden, head, states.labels, R.to(states.hidden.dtype))
        return errors.double().T @ pre.whiten(states.hidden).double()

    def unit(S):
        return S / S.norm()

    target = sum(unit(sketch(s)) for s in valid) / len(valid)
    return np.array([float((unit(sketch(s)) * target).sum()) for s in train])


def stored_bytes(states, k, dim, bytes_per_value=2):
    """Mean bytes per sample of each layout in bf16."""
    tokens = float(np.mean([len(s.positions) for s in states]))
    return {"matrix": k * dim * bytes_per_value, "tokens": tokens * (dim + k) * bytes_per_value}


def task_and_metric(name: str, size: str, seed: int):
    """Training and validation samples, and the task's metric of a vector of values."""
    if name == "demo":
        task = make_demo_task(seed)
        return task.train, task.valid, lambda values: roc_auc(-values, task.mislabelled)
    task = make_eval_task(name, size, seed)
    return task.train, task.valid, lambda values: score_values(task, values)["auc_mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="demo", choices=("demo", "mislabeled", "selection"))
    parser.add_argument("--size", default="small", help="size of a forvalue eval task")
    parser.add_argument("--rows", default=",".join(map(str, SKETCH_ROWS)), help="sketch rows k")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--repeats", type=int, default=2, help="sketch seeds per layout")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    config = ValuationConfig.for_command("select")
    valuator = Valuator(load_model("smollm2-135m"), config=config, progress=False)
    head = valuator.model.head_weight
    rows = []
    for seed in map(int, args.seeds.split(",")):
        train_samples, valid_samples, metric = task_and_metric(args.task, args.size, seed)
        exact = valuator.score(train_samples, valuator.reference(valid_samples))
        train, valid = valuator.label_states(train_samples), valuator.label_states(valid_samples)
        moments = MomentAccumulator(head.shape[1], head.device)
        for states in valid:
            moments.add(states.hidden)
        pre = Preconditioner(moments.moment_sum, moments.tokens, 0.01)  # select's: A from the target
        row = {"seed": seed, "exact_auc": metric(exact), "sketch_rows": {}}
        for k in map(int, args.rows.split(",")):
            runs = [sketched_values(train, valid, head, pre, k, 1000 * r + k) for r in range(args.repeats)]
            row["sketch_rows"][k] = {"auc": [metric(v) for v in runs],
                                     "corr": [float(np.corrcoef(v, exact)[0, 1]) for v in runs],
                                     "bytes_per_sample_bf16": stored_bytes(train, k, head.shape[1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = (f"python bench/experiments/index_layouts.py --task {args.task} --size {args.size} "
               f"--rows {args.rows} --seeds {args.seeds} --repeats {args.repeats}")
    args.out.write_text(json.dumps({"machine": machine(), "seconds": time.perf_counter() - started,
                                    "command": command, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
