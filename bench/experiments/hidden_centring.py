"""Why For-Value can miss mislabeled answers: the hidden-state factor of the value.

``v(a, R) = sum_t sum_s <e_t, e_s> <h_t, h_s>`` over the label tokens t of a training sample
and s of the validation set. When every last-layer hidden state shares one large direction,
``<h_t, h_s>`` is nearly the same for every pair; the value then reduces to the summed error
agreement, in which a class-balanced validation set holds as many samples agreeing with a
flipped answer as with a correct one. This diagnosis measures the mean cosine between training
and validation hidden states, and the task metric of For-Value with the hidden states as they
are and centred on the validation mean (``h - mu`` in the contraction; the errors unchanged),
over all label tokens and over each sample's first one only (the class word; the others are
end-of-turn tokens whose errors every sample shares). The centred value is a diagnosis, not a
method of the package.

    python bench/experiments/hidden_centring.py --task mislabeled --size full --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forvalue.bench.common import machine
from forvalue.bench.evals.baselines import log_probs
from forvalue.bench.evals.eval import score_values
from forvalue.bench.evals.tasks import SIZES, make_task
from forvalue.engine import Valuator

REFERENCE_TASKS = ("mislabeled", "selection")


TokenStates = tuple[torch.Tensor, torch.Tensor]  # label tokens' hidden states and errors


def _token_states(model: Any, samples: Sequence[dict], loss_on: str) -> list[TokenStates]:
    """Per sample, its label tokens' hidden states ``(n, d)`` and errors ``(n, V)`` in float32
    (float64 for a float64 model)."""
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    out: list[TokenStates] = []
    with torch.no_grad():
        for states in Valuator(model, loss_on=loss_on, progress=False).label_states(samples):
            hidden = states.hidden.to(dtype)
            errors = -log_probs(model, hidden, model.head_weight.to(dtype)).exp()
            errors[torch.arange(len(states.labels)), states.labels] += 1
            out.append((hidden, errors))
    return out


def centred_values(model: Any, train: Sequence[dict], valid: Sequence[dict], *,
                   loss_on: str = "response", first_token_only: bool = False) -> dict[str, Any]:
    """For-Value of each training sample against the validation mean ``Gbar``, with the hidden
    states as they are (``"plain"``: the package's number) and centred on the validation mean
    (``"centred"``), and the cosines between training and validation hidden states.
    ``first_token_only`` keeps each sample's first label token (the class word of a
    classification answer) and drops the rest (the end-of-turn tokens)."""
    train_states, valid_states = _token_states(model, train, loss_on), _token_states(model, valid, loss_on)
    if first_token_only:
        train_states, valid_states = _first_tokens(train_states), _first_tokens(valid_states)
    return _values(train_states, valid_states)


def _first_tokens(states: list[TokenStates]) -> list[TokenStates]:
    return [(hidden[:1], errors[:1]) for hidden, errors in states]


def _values(train_states: list[TokenStates], valid_states: list[TokenStates]) -> dict[str, Any]:
    valid_hidden = torch.cat([h for h, _ in valid_states])
    valid_errors = torch.cat([e for _, e in valid_states])
    mean = valid_hidden.mean(0)
    valid_unit = valid_hidden / valid_hidden.norm(dim=1, keepdim=True)
    plain, centred, cosines = [], [], []
    for hidden, errors in train_states:
        agreement = (errors @ valid_errors.T) / len(valid_states)  # <e_t, e_s>, over the mean's count
        plain.append(float((agreement * (hidden @ valid_hidden.T)).sum()))
        centred.append(float((agreement * ((hidden - mean) @ (valid_hidden - mean).T)).sum()))
        cosines.append((hidden / hidden.norm(dim=1, keepdim=True)) @ valid_unit.T)
    cosine = torch.cat(cosines).flatten()
    return {"plain": np.array(plain), "centred": np.array(centred),
            "cosine_mean": float(cosine.mean()), "cosine_std": float(cosine.std())}


def diagnose(task_name: str, size: str, seed: int = 0, model_name: str = "smollm2-135m") -> dict[str, Any]:
    """The diagnosis on one task, over all label tokens and over each sample's first one:
    metrics of the plain and centred values and the cosines; and how far the plain value over
    all tokens is from the package's Valuator (a check of this script)."""
    from forvalue.engine import load_model

    if task_name not in REFERENCE_TASKS:
        raise ValueError(f"the diagnosis values against the validation set: choose one of {REFERENCE_TASKS}")
    task = make_task(task_name, size, seed)
    model = load_model(model_name)
    start = time.perf_counter()
    train = _token_states(model, task.train, task.loss_on)
    valid = _token_states(model, task.valid, task.loss_on)
    tokens = {"all": _values(train, valid), "first": _values(_first_tokens(train), _first_tokens(valid))}
    valuator = Valuator(model, loss_on=task.loss_on, progress=False)
    package = valuator.score(task.train, valuator.reference(task.valid))
    return {"task": task_name, "size": size, "seed": seed, "model": model_name, "loss_on": task.loss_on,
            "n_train": len(task.train), "n_valid": len(task.valid),
            "tokens": {name: {"cosine_mean": r["cosine_mean"], "cosine_std": r["cosine_std"],
                              "plain": score_values(task, r["plain"]),
                              "centred": score_values(task, r["centred"])}
                       for name, r in tokens.items()},
            "max_rel_diff_vs_valuator": float(np.abs(tokens["all"]["plain"] - package).max()
                                              / np.abs(package).max()),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/experiments/hidden_centring.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="all", choices=[*REFERENCE_TASKS, "all"])
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    names = REFERENCE_TASKS if args.task == "all" else (args.task,)
    results = [diagnose(name, args.size, args.seed, args.model) for name in names]
    print(f"{'task':11s} {'size':5s} {'label tokens':12s} {'cos(h_a,h_b)':>14s} {'AUC plain':>10s} "
          f"{'AUC centred':>12s}")
    for r in results:
        for name, t in r["tokens"].items():
            cosine = f"{t['cosine_mean']:7.3f} +- {t['cosine_std']:.3f}"
            print(f"{r['task']:11s} {r['size']:5s} {name:12s} {cosine} {t['plain']['auc_mean']:10.3f} "
                  f"{t['centred']['auc_mean']:12.3f}")
        print(f"{r['task']}: plain value over all label tokens vs the Valuator: "
              f"{r['max_rel_diff_vs_valuator']:.1e} relative")
    if args.out:
        options = sys.argv[1:] if argv is None else argv
        command = " ".join(["python bench/experiments/hidden_centring.py", *options])
        report = {"command": command, "machine": machine(), "tasks": results}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
