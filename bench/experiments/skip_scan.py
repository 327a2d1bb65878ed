"""Which depth the skip readout reads (engine/model/skip.py): the scan behind ``skip_depth=0.75``.

For each of a few layers ``l`` (1/4, 1/2, 3/4 of the depth, the layer before the last, and
the last: the paper's states), the final errors ``e_t`` are contracted with that layer's
states, ``G_l = sum_t e_t h_l,t^T``, each whitened by its validation set's second moment
(damping 0.01), and valued as the preconditioned cosine value against the validation set
(the mean over validation samples of pairwise cosines); then the same for the concatenation
of a few layers (block by block whitened, one cosine over the blocks). Dense and simple:
the error gram of training and validation tokens is built in full (``T_train x T_valid``), so
this is a diagnosis for small tasks and plain heads (no bias, scale or softcap), not a method
of the package. The package's readout
(``skip_depth``) whitens its two blocks jointly and applies the final norm to ``r_t``.

    python bench/experiments/skip_scan.py --tasks selection,mislabeled,demo --out FILE.json
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
from forvalue.bench.evals.tasks import make_task
from forvalue.engine import load_model
from forvalue.engine.inputs.samples import encode_sample
from forvalue.engine.valuation.ranking import roc_auc

DEMO_SEEDS = range(5)


def layers_of(num_layers: int) -> list[int]:
    """Indices into ``output_hidden_states`` (0: embeddings; ``num_layers``: the final, normed)."""
    return [num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 2, num_layers]


def layer_sets(layers: list[int]) -> dict[str, list[int]]:
    half, three_quarters, last = layers[1], layers[2], layers[-1]
    return {**{f"L{layer}": [layer] for layer in layers},
            f"L{last}+L{three_quarters}": [three_quarters, last],
            f"L{last}+L{half}+L{three_quarters}": [half, three_quarters, last],
            "all": layers}


@torch.no_grad()
def token_states(model: Any, samples: Sequence[dict], layers: list[int],
                 loss_on: str = "response") -> list[dict[str, Any]]:
    """Per sample: the errors ``e_t`` (``n x V``) and the states of each layer (float64)."""
    weight = model.head_weight.float()
    out = []
    for sample in samples:
        encoded = encode_sample(sample, model.tokenizer, where=str(sample.get("id")), loss_on=loss_on)
        ids = torch.tensor([encoded.input_ids])
        positions = torch.tensor(encoded.label_positions()) - 1
        hidden = model.causal_lm(ids, output_hidden_states=True, use_cache=False).hidden_states
        errors = -torch.softmax(hidden[-1][0, positions].float() @ weight.T, dim=-1)
        errors[torch.arange(len(positions)), ids[0, positions + 1]] += 1
        out.append({"e": errors, "h": {layer: hidden[layer][0, positions].double() for layer in layers}})
    return out


def whitening(valid: list[dict[str, Any]], layer: int, damping: float = 0.01) -> torch.Tensor:
    states = torch.cat([v["h"][layer] for v in valid])
    A = states.T @ states / len(states)
    return torch.linalg.inv(A + damping * torch.trace(A) / len(A) * torch.eye(len(A), dtype=A.dtype))


def scan(model: Any, train: Sequence[dict], valid: Sequence[dict], positive: np.ndarray) -> dict[str, float]:
    """AUC of the value for ``positive`` training samples, per layer set."""
    layers = layers_of(model.causal_lm.config.num_hidden_layers)
    tr, va = token_states(model, train, layers), token_states(model, valid, layers)
    valid_errors = torch.cat([v["e"] for v in va])
    owner = torch.repeat_interleave(torch.arange(len(va)), torch.tensor([len(v["e"]) for v in va]))
    P = {layer: whitening(va, layer) for layer in layers}
    valid_states = {layer: torch.cat([v["h"][layer] for v in va]) @ P[layer] for layer in layers}

    def against_valid(x: dict[str, Any]) -> dict[int, torch.Tensor]:
        error_gram = (x["e"] @ valid_errors.T).double()
        return {layer: torch.zeros(len(va), dtype=torch.float64).index_add_(
                    0, owner, (error_gram * (x["h"][layer] @ valid_states[layer].T)).sum(0))
                for layer in layers}

    def squared_norms(x: dict[str, Any]) -> dict[int, float]:
        error_gram = (x["e"] @ x["e"].T).double()
        return {layer: float((error_gram * (x["h"][layer] @ P[layer] @ x["h"][layer].T)).sum())
                for layer in layers}

    valid_norms = [squared_norms(v) for v in va]
    raw, norms = [against_valid(x) for x in tr], [squared_norms(x) for x in tr]
    result = {}
    for name, chosen in layer_sets(layers).items():
        v_norm = np.array([sum(n[layer] for layer in chosen) for n in valid_norms])
        values = [np.mean(sum(r[layer] for layer in chosen).numpy()
                          / np.sqrt(sum(n[layer] for layer in chosen) * v_norm))
                  for r, n in zip(raw, norms, strict=True)]
        result[name] = roc_auc(np.array(values), positive)
    return result


def task_cases(name: str) -> list[tuple[str, list[dict], list[dict], np.ndarray]]:
    """(label, train, valid, positives: clean training samples) of a task name."""
    if name == "demo":
        from forvalue.bindings.cli.demo import make_task as make_demo

        return [(f"demo-{seed}", demo.train, demo.valid, ~demo.mislabelled)
                for seed in DEMO_SEEDS for demo in [make_demo(seed)]]
    task = make_task(name, "full")
    if task.kind == "selection":
        return [(name, task.train, task.valid, task.train_meta("clean_label") == 1)]
    return [(name, task.train, task.valid, task.train_meta("flipped") == 0)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/experiments/skip_scan.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="selection,mislabeled,demo,mislabeled-sport",
                        help="comma-separated: selection, mislabeled, mislabeled-sport (full size), demo")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model = load_model(args.model, device="cpu", dtype="float32")
    results: dict[str, Any] = {"model": args.model, "machine": machine(), "threads": torch.get_num_threads()}
    for name in args.tasks.split(","):
        for label, train, valid, positive in task_cases(name):
            start = time.perf_counter()
            results[label] = {**scan(model, train, valid, positive), "seconds": time.perf_counter() - start}
            print(label, json.dumps({k: round(v, 3) for k, v in results[label].items()}), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
