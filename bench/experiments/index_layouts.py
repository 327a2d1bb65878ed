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
and the bytes per sample of each layout reported beside it. Run:

    python bench/experiments/index_layouts.py --seeds 0,1,2,3,4 --out FILE.json
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
from forvalue.bindings.cli.demo import make_task
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        task = make_task(seed)
        exact = valuator.score(task.train, valuator.reference(task.valid))
        train, valid = valuator.label_states(task.train), valuator.label_states(task.valid)
        moments = MomentAccumulator(head.shape[1], head.device)
        for states in valid:
            moments.add(states.hidden)
        pre = Preconditioner(moments.moment_sum, moments.tokens, 0.01)  # select's: A from the target
        row = {"seed": seed, "exact_auc": roc_auc(-exact, task.mislabelled), "sketch_rows": {}}
        for k in SKETCH_ROWS:
            runs = [sketched_values(train, valid, head, pre, k, 1000 * r + k) for r in range(args.repeats)]
            row["sketch_rows"][k] = {"auc": [roc_auc(-v, task.mislabelled) for v in runs],
                                     "corr": [float(np.corrcoef(v, exact)[0, 1]) for v in runs],
                                     "bytes_per_sample_bf16": stored_bytes(train, k, head.shape[1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "seconds": time.perf_counter() - started,
                                    "command": "python bench/experiments/index_layouts.py --seeds "
                                               f"{args.seeds} --repeats {args.repeats}",
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
