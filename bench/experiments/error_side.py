"""An experiment, not kept in the package: an error-side (vocabulary-diagonal) preconditioner.

The preconditioned value whitens the input side of ``G = sum_t e_t h_t^T`` with the hidden
states' second moment ``A``. Its output-side twin (K-FAC's other factor, or Adam's per-row
scale) weights each vocabulary entry of ``e_t . e_s`` by ``w_v = 1 / (s_v + mu mean(s))^power``
with ``s_v`` the mean of ``e_t[v]^2`` over the validation set's label tokens:

    v(a, b) = sum_t sum_s (h'_t . h'_s) (sum_v w_v e_t[v] e_s[v]),  h' = C^-1 h (validation A)

computed here directly (dense errors of each label token), against the validation set as a
whole, plain and with cosine normalisation; ``w = 1`` is the package's preconditioned value
for a model without a logit transform (bias, scale, softcap), such as the embedded one, the
only model it runs.
Results: bench/results/quality.md ("Tried and not kept").

    python bench/experiments/error_side.py --task mislabeled --size small --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from hidden_centring import REFERENCE_TASKS

from forvalue.bench.common import machine
from forvalue.bench.evals.eval import score_values
from forvalue.bench.evals.tasks import SIZES, make_task
from forvalue.engine import Valuator, load_model
from forvalue.engine.outputs import LabelStates
from forvalue.engine.valuation.precondition import DAMPING_VALID, Preconditioner

MUS = (0.1, 1.0, 10.0)
POWERS = (0.5, 1.0)


def errors(states: LabelStates, head: torch.Tensor) -> torch.Tensor:
    """``onehot(y_t) - p_t`` per label token, ``(n, V)`` float32."""
    p = torch.softmax(states.hidden.float() @ head.T, dim=1)
    p[torch.arange(len(states.labels)), states.labels] -= 1.0
    return -p


def weights(valid_errors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each variant's vocabulary weights; "none": all ones."""
    s = (valid_errors ** 2).mean(0)
    out = {"none": torch.ones_like(s)}
    for mu in MUS:
        for power in POWERS:
            out[f"mu{mu}-p{power}"] = 1.0 / (s + mu * s.mean()) ** power
    return out


def values(train: list[LabelStates], valid: list[LabelStates], head: torch.Tensor,
           pre: Preconditioner, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise values ``(n_train, n_valid)``, plain and cosine-normalised."""
    valid_e = [errors(s, head) for s in valid]
    valid_h = [pre.whiten(s.hidden.float()) for s in valid]
    all_e, all_h = torch.cat(valid_e), torch.cat(valid_h)
    segment = torch.repeat_interleave(torch.arange(len(valid)), torch.tensor([len(s.labels) for s in valid]))
    valid_norm = np.array([float((((e * w) @ e.T) * (h @ h.T)).sum())
                           for e, h in zip(valid_e, valid_h, strict=True)])
    plain, train_norm = np.zeros((len(train), len(valid))), np.zeros(len(train))
    for i, states in enumerate(train):
        e, h = errors(states, head), pre.whiten(states.hidden.float())
        weighted = e * w
        products = (weighted @ all_e.T) * (h @ all_h.T)
        plain[i] = torch.zeros(len(valid)).index_add_(0, segment, products.sum(0)).numpy()
        train_norm[i] = float(((weighted @ e.T) * (h @ h.T)).sum())
    return plain, plain / np.sqrt(train_norm)[:, None] / np.sqrt(valid_norm)[None, :]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=REFERENCE_TASKS, required=True)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = load_model()
    task = make_task(args.task, args.size)
    valuator = Valuator(model, loss_on="response", progress=False)
    train, valid = valuator.label_states(task.train), valuator.label_states(task.valid)
    hidden = torch.cat([s.hidden for s in valid]).double()
    pre = Preconditioner(hidden.T @ hidden, hidden.shape[0], DAMPING_VALID)
    head = model.head_weight.float()
    results = {}
    for name, w in weights(torch.cat([errors(s, head) for s in valid])).items():
        for norm, pairwise in zip(("plain", "cosine"), values(train, valid, head, pre, w), strict=True):
            results[f"{name}/{norm}"] = score_values(task, pairwise.mean(axis=1))
            print(f"{name:>12} {norm:>6} AUC {results[f'{name}/{norm}']['auc_mean']:.3f}", flush=True)
    args.out.write_text(json.dumps({"task": args.task, "size": args.size, "machine": machine(),
                                    "seconds": time.perf_counter() - start, "results": results}, indent=1))


if __name__ == "__main__":
    main()
