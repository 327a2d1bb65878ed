"""What the last-layer value misses on low-quality answers: readouts, whitening and signals.

A dense diagnosis for small tasks (the scan behind the answers-task work in
bench/results/quality.md). For each task and seed it keeps every label token's final error
``e_t`` and the states of a few layers, then values each training sample against the
validation set under many variants, all from the same forward pass:

- **layers**: the final states (the paper's), 3/4 of the depth (select's skip readout), 1/2;
- **damping** of each block's whitening ``P_l = (A_l + lambda tr(A_l)/d I)^-1``, and where
  ``A_l`` comes from: the validation tokens (select's default) or the validation and pool tokens;
- **combination** of the blocks: one cosine over all blocks (the package's readout, but with
  each block whitened alone), or the mean of each block's cosine ranks;
- **contrast**: the mean cosine to the validation samples minus the mean cosine to the pool
  (what separates the target from the pool as it is);
- **self-influence**: the rank of ``-||G(x)||_P`` averaged with the value's rank;
- **token aggregation**: the value is a sum of per-token contributions; a local defect (one
  surprising token among fluent ones) shows in the smallest contribution (``min``) or the sum
  of the negative ones (``neg``) more than in the sum;
- the label rule: the answer's tokens (``response``) or every token (``all``: the question's
  tokens too).

The error gram is built in full (``T_train x T_train``), so this is for small tasks and plain
heads (no bias, scale or softcap), not a method of the package.

    python bench/experiments/readout_variants.py --tasks answers,answers-64 --seeds 0,1,2 --out FILE.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skip_scan import token_states

from forvalue.bench.common import machine
from forvalue.bench.evals.tasks import make_task
from forvalue.engine import load_model
from forvalue.engine.valuation.ranking import roc_auc

DAMPINGS = (0.001, 0.01, 0.1)
SOURCES = ("valid", "valid+pool")


def layers_of(num_layers: int) -> dict[str, int]:
    """Named readouts: indices into ``output_hidden_states`` (``num_layers``: final, normed)."""
    return {"last": num_layers, "3/4": 3 * num_layers // 4, "1/2": num_layers // 2}


def stacked(data: list[dict[str, Any]], layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor],
                                                                       torch.Tensor]:
    """All tokens of ``data``: errors, states per layer, and each token's sample index."""
    owner = torch.repeat_interleave(torch.arange(len(data)), torch.tensor([len(x["e"]) for x in data]))
    return (torch.cat([x["e"] for x in data]), {layer: torch.cat([x["h"][layer] for x in data])
                                                 for layer in layers}, owner)


def per_sample(token_matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int,
               n_cols: int) -> torch.Tensor:
    """Sum a token x token matrix into a sample x sample one."""
    by_col = torch.zeros(token_matrix.shape[0], n_cols, dtype=token_matrix.dtype).index_add_(
        1, cols, token_matrix)
    return torch.zeros(n_rows, n_cols, dtype=token_matrix.dtype).index_add_(0, rows, by_col)


def whitening(states: torch.Tensor, damping: float) -> torch.Tensor:
    A = states.T @ states / len(states)
    return torch.linalg.inv(A + damping * torch.trace(A) / len(A) * torch.eye(len(A), dtype=A.dtype))


def grams(model: Any, train: list[dict], valid: list[dict], loss_on: str, dampings: list[float],
          sources: list[str]) -> dict[tuple, dict[str, Any]]:
    """Per (layer, damping, source): the sample grams <G(a), G(b)>_P of pool x pool and pool x
    validation (also per pool token), and the validation samples' squared norms."""
    names = layers_of(model.causal_lm.config.num_hidden_layers)
    layers = list(names.values())
    e_tr, h_tr, o_tr = stacked(token_states(model, train, layers, loss_on), layers)
    e_va, h_va, o_va = stacked(token_states(model, valid, layers, loss_on), layers)
    eg_tt, eg_tv = (e_tr @ e_tr.T).double(), (e_tr @ e_va.T).double()
    eg_vv = (e_va @ e_va.T).double()
    del e_tr, e_va
    n_tr, n_va = len(train), len(valid)
    out = {}
    for (name, layer), damping, source in itertools.product(names.items(), dampings, sources):
        cov = h_va[layer] if source == "valid" else torch.cat([h_va[layer], h_tr[layer]])
        P = whitening(cov, damping)
        white_tr = h_tr[layer] @ P
        tokens = torch.zeros(len(o_tr), n_va, dtype=torch.float64).index_add_(
            1, o_va, eg_tv * (white_tr @ h_va[layer].T))
        out[name, damping, source] = {
            "owner": o_tr, "tokens": tokens,
            "pool": per_sample(eg_tt * (white_tr @ h_tr[layer].T), o_tr, o_tr, n_tr, n_tr),
            "cross": torch.zeros(n_tr, n_va, dtype=torch.float64).index_add_(0, o_tr, tokens),
            "valid": per_sample(eg_vv * (h_va[layer] @ P @ h_va[layer].T), o_va, o_va, n_va, n_va).diagonal()}
    return out


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable") / max(len(x) - 1, 1)


def token_aggregates(parts: list[dict[str, Any]], norms: np.ndarray, valid_norms: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """The cosine value's per-token contributions, reduced per sample by ``min`` and ``neg``."""
    owner = parts[0]["owner"]
    contribution = (sum(p["tokens"] for p in parts) / torch.from_numpy(valid_norms)).mean(1)
    contribution = contribution / torch.from_numpy(norms)[owner]
    n = len(norms)
    lowest = torch.full((n,), torch.inf, dtype=torch.float64).scatter_reduce(0, owner, contribution, "amin")
    negative = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, contribution.clamp(max=0))
    return {"min": lowest.numpy(), "neg": negative.numpy()}


def variants(g: dict[tuple, dict[str, Any]], dampings: list[float],
             sources: list[str]) -> dict[str, np.ndarray]:
    """Each variant's value per training sample (higher: cleaner / more useful)."""
    blocks = {"last": ["last"], "last+3/4": ["last", "3/4"], "last+1/2+3/4": ["last", "1/2", "3/4"],
              "3/4": ["3/4"], "1/2": ["1/2"]}
    out = {}
    for (label, chosen), damping, source in itertools.product(blocks.items(), dampings, sources):
        parts = [g[name, damping, source] for name in chosen]
        pool = sum(p["pool"] for p in parts).numpy()
        cross = sum(p["cross"] for p in parts).numpy()
        norms = np.sqrt(np.diagonal(pool))
        valid_norms = np.sqrt(sum(p["valid"] for p in parts).numpy())
        cosine = cross / np.outer(norms, valid_norms)
        value = cosine.mean(1)
        key = f"{label} d{damping} {source}"
        out[key] = value
        out[key + " contrast"] = value - (pool / np.outer(norms, norms)).mean(1)
        out[key + " +self"] = ranks(value) + ranks(-norms)
        for name, reduced in token_aggregates(parts, norms, valid_norms).items():
            out[f"{key} {name}"] = reduced
            out[f"{key} sum+{name}"] = ranks(value) + ranks(reduced)
        if len(chosen) > 1:
            out[key + " rank-mean"] = sum(
                ranks((p["cross"].numpy() / np.outer(np.sqrt(np.diagonal(p["pool"].numpy())),
                                                     np.sqrt(p["valid"].numpy()))).mean(1)) for p in parts)
    return out


def positives(task: Any) -> np.ndarray:
    if task.kind == "selection":
        return task.train_meta("clean_label") == 1
    return task.train_meta("flipped") == 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/experiments/readout_variants.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="answers,answers-64,selection,mislabeled")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", default="full", choices=("small", "full"))
    parser.add_argument("--loss-on", default="response,all")
    parser.add_argument("--dampings", default=",".join(map(str, DAMPINGS)))
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model = load_model(args.model, device="cpu", dtype="float32")
    results: dict[str, Any] = {"model": args.model, "machine": machine(), "threads": torch.get_num_threads(),
                               "size": args.size, "auc": {}}
    for name, seed, loss_on in itertools.product(args.tasks.split(","), args.seeds.split(","),
                                                  args.loss_on.split(",")):
        task = make_task(name, args.size, int(seed))
        start = time.perf_counter()
        dampings, sources = [float(x) for x in args.dampings.split(",")], args.sources.split(",")
        values = variants(grams(model, task.train, task.valid, loss_on, dampings, sources), dampings, sources)
        clean = positives(task)
        aucs = {key: roc_auc(value, clean) for key, value in values.items()}
        results["auc"][f"{name}/{seed}/{loss_on}"] = aucs
        if "corruption" in task.train[0].get("meta", {}):  # the answers tasks: AUC per kind
            kind = task.train_meta("corruption")
            results.setdefault("auc_by_kind", {})[f"{name}/{seed}/{loss_on}"] = {
                k: {key: roc_auc(value[(kind == k) | clean], clean[(kind == k) | clean])
                    for key, value in values.items()} for k in set(kind) - {"none"}}
        best = sorted(aucs.items(), key=lambda kv: -kv[1])[:3]
        print(f"{name}/{seed}/{loss_on} {time.perf_counter() - start:.0f}s", best, flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
