"""``forvalue eval --task downstream``: does selecting with a value help the model trained on it?

Per seed: a noisy pool of question/answer samples (40% of answers corrupted), a clean
validation set, and clean held-out questions of the same five kinds. Two corruptions:
``downstream``: words deleted or filler words inserted, as in the selection task (the answer
stays right, its form breaks); ``downstream-facts``: the answer states a wrong fact in the
same words (another capital, a wrong sum...), so that training on it teaches something false
about questions the held-out set asks again.

Each method selects the same budget (20% of the pool) by its values (the top ones;
``...-round-robin``: the validation samples take their most valuable one in turn); ``random``
selects at random, ``pool`` takes the whole pool, and ``oracle-clean`` selects at random among
the clean samples (it reads the ground truth: not a method, the best a perfect filter followed
by a random draw can do, which bounds what cleanliness alone can gain). A LoRA fine-tune of the
model then runs the same number of steps on each selection, and is scored on the held-out
questions: the mean negative log-likelihood of the clean answers (primary), the exact-match
rate of greedy answers, and the negative log-likelihood of the stated fact alone (the capital,
leg count, sum, opposite or product, given the question and the answer up to it), which a
wrong-fact corruption targets. A method "beats" another when the mean difference over seeds
exceeds twice the larger standard deviation.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .methods import METHODS, Context
from .tasks import Task, corrupt, qa_pair, qa_sample, with_ids

# Pool, validation, held-out; fine-tuning steps of batch 4 (three passes over a 20% selection).
DOWNSTREAM_SIZES = {"small": (20, 4, 6, 3), "full": (120, 16, 24, 18)}
BUDGET = 0.2
CORRUPT_SHARE = 0.4
SELECTORS = ("forvalue-response", "forvalue-response-precond-valid-cosine",
             "forvalue-response-precond-valid-cosine-round-robin",
             "forvalue-response-precond-valid-cosine-skip",
             "forvalue-response-precond-valid-cosine-skip-round-robin",
             "lora-less", "random", "pool", "oracle-clean")
ROUND_ROBIN = "-round-robin"  # the validation samples take their best in turn (engine/valuation/ranking.py)


CORRUPTIONS = {"downstream": "words", "downstream-facts": "facts"}  # task name: corruption
# Where each kind of answer (bench/evals/tasks.py, qa_pair) states its fact: the first match's group.
FACT = re.compile(r"(?:capital of \w+ is|has|gives|opposite of \w+ is|equal) ([\w ]+?)(?:,| legs| in total| "
                  r"centimeters)")
METRICS = ("nll", "fact_nll")  # compared between methods, lower is better


@dataclass(frozen=True)
class DownstreamTask:
    pool: list[dict]
    valid: list[dict]
    held_out: list[dict]  # clean: {"prompt", "response"}
    steps: int


def make_downstream(size: str, seed: int, corruption: str = "words") -> DownstreamTask:
    n_pool, n_valid, n_held_out, steps = DOWNSTREAM_SIZES[size]
    rng = random.Random(seed)
    corrupted = set(rng.sample(range(n_pool), round(CORRUPT_SHARE * n_pool)))
    pool = []
    for i in range(n_pool):
        if corruption == "facts":
            question, answer = qa_pair(rng, wrong=i in corrupted)
        else:
            question, answer = qa_pair(rng)
            answer = corrupt(answer, rng) if i in corrupted else answer
        pool.append(qa_sample(question, answer, clean=i not in corrupted))
    valid = [qa_sample(*qa_pair(rng), clean=True) for _ in range(n_valid)]
    held_out = [qa_sample(*qa_pair(rng), clean=True) for _ in range(n_held_out)]
    return DownstreamTask(with_ids(pool, "pool"), with_ids(valid, "valid"), with_ids(held_out, "test"), steps)


def select(model: Any, task: DownstreamTask, method: str, seed: int, lora_rank: int) -> list[int]:
    """Indices of the pool samples ``method`` keeps (the budget's highest values)."""
    n = len(task.pool)
    budget = max(1, round(BUDGET * n))
    if method == "pool":
        return list(range(n))
    if method == "random":
        # A stream of its own: Random(seed) would replay the pool's corruption draw.
        return draw(list(range(n)), budget, f"select-{seed}")
    if method == "oracle-clean":
        clean = [i for i, s in enumerate(task.pool) if s["meta"]["clean_label"]]
        return draw(clean, budget, f"oracle-{seed}")
    if method.endswith(ROUND_ROBIN):
        from forvalue.engine.valuation.ranking import round_robin

        return sorted(round_robin(_values(model, task, method.removesuffix(ROUND_ROBIN), lora_rank,
                                          pairwise=True), budget))
    values = _values(model, task, method, lora_rank)
    return sorted(np.argsort(-values, kind="stable")[:budget].tolist())


def draw(indices: list[int], budget: int, key: str) -> list[int]:
    """``budget`` of ``indices`` (all when fewer) drawn by a generator seeded with ``key``, sorted."""
    return sorted(random.Random(key).sample(indices, min(budget, len(indices))))


def _values(model: Any, task: DownstreamTask, method: str, lora_rank: int,
            pairwise: bool = False) -> np.ndarray:
    """Per pool sample, its value against the validation set (``pairwise``, For-Value only:
    against each validation sample); For-Value methods are ``forvalue eval``'s, by name."""
    from . import baselines

    if method == "lora-less":
        grads = baselines.lora_gradients(model, task.pool, task.valid, loss_on="response", rank=lora_rank)
        return baselines.less_values(grads).mean(axis=1)
    ctx = Context(model, Task("downstream", "selection", task.pool, task.valid, loss_on="response"),
                  loss_on="response", lora_rank=lora_rank, progress=False)
    exact = next(m for m in METHODS if m.name == method)
    return (exact.pairwise if pairwise else exact.run)(ctx)


def fine_tune_and_test(model: Any, task: DownstreamTask, chosen: list[int], seed: int,
                       lora_rank: int) -> dict[str, float]:
    """LoRA for ``task.steps`` steps on the chosen samples, then the held-out metrics."""
    from forvalue.engine.inputs.samples import encode_sample
    from forvalue.engine.warmup import label_nll, lora_copy, train_lora

    def encode(samples: list[dict]) -> list[Any]:
        return [encode_sample(s, model.tokenizer, where=s["id"], context_length=model.context_length)
                for s in samples]

    lora = lora_copy(model, rank=lora_rank, seed=seed)
    with torch.enable_grad():
        train_lora(model, lora, encode([task.pool[i] for i in chosen]), steps=task.steps, lr=1e-3, seed=seed)

    def mean_nll(samples: list[dict]) -> float:
        encoded = encode(samples)
        return float(torch.cat([label_nll(model, lora.backbone, encoded[i:i + 8])
                                for i in range(0, len(encoded), 8)]).mean())

    with torch.no_grad():
        nll, fact_nll = mean_nll(task.held_out), mean_nll([fact_sample(s) for s in task.held_out])
        exact = float(np.mean([_greedy_answer(model, lora, s) == s["response"].strip()
                               for s in task.held_out]))
    return {"nll": nll, "exact_match": exact, "fact_nll": fact_nll}


def fact_sample(sample: dict) -> dict:
    """The sample's stated fact as the response, the question and the answer before it as the
    prompt."""
    found = FACT.search(sample["response"])
    if found is None:
        raise ValueError(f"no stated fact in {sample['response']!r}")
    start, end = found.span(1)
    return {"prompt": sample["prompt"] + sample["response"][:start].rstrip(),
            "response": sample["response"][start - 1:end], "id": f"{sample['id']}-fact"}


def _greedy_answer(model: Any, lora: Any, sample: dict) -> str:
    """The fine-tuned model's greedy answer to the sample's prompt, up to the end of its line."""
    tokenizer = model.tokenizer
    prompt = tokenizer(sample["prompt"])["input_ids"]
    limit = len(tokenizer(sample["response"], add_special_tokens=False)["input_ids"]) + 4
    output = lora.peft_model.generate(input_ids=torch.tensor([prompt], device=model.device),
                                      attention_mask=torch.ones((1, len(prompt)), dtype=torch.long,
                                                                device=model.device),
                                      max_new_tokens=limit, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True).strip().split("\n")[0].strip()


def run_downstream(model: Any, size: str, seeds: list[int], lora_rank: int = 8,
                   methods: tuple[str, ...] = SELECTORS,
                   on_seed: Callable[[dict[str, Any]], None] | None = None,
                   corruption: str = "words") -> dict[str, Any]:
    """Every method on every seed; per method the mean and std of each metric, and the
    comparisons a selection must win (does it beat random, the pool, LESS). ``on_seed``
    gets the summary so far after each seed (so that a long run loses nothing when cut)."""
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for seed in seeds:
        task = make_downstream(size, seed, corruption)
        for method in methods:
            start = time.perf_counter()
            chosen = select(model, task, method, seed, lora_rank)
            selected = time.perf_counter() - start
            clean = float(np.mean([task.pool[i]["meta"]["clean_label"] for i in chosen]))
            metrics = fine_tune_and_test(model, task, chosen, seed, lora_rank)
            runs[method].append({**metrics, "clean_share": clean, "select_seconds": selected,
                                 "seconds": time.perf_counter() - start})
            print(f"  seed {seed} {method}: nll {metrics['nll']:.3f}, exact {metrics['exact_match']:.2f}, "
                  f"fact nll {metrics['fact_nll']:.3f}, clean {clean:.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        if on_seed is not None:
            on_seed(_summary(runs))
    return _summary(runs)


def _summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    return {"methods": {m: _mean_std(r) for m, r in runs.items()}, "runs": runs,
            "comparisons": _comparisons(runs)}


def _mean_std(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in runs[0]:
        values = np.array([r[key] for r in runs])
        out[f"{key}_mean"], out[f"{key}_std"] = float(values.mean()), float(values.std())
    return out


def _comparisons(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """For each method against each other, per metric (lower is better): the mean difference
    (``nll_gain``, ``fact_nll_gain``) and whether it exceeds twice the larger std (``beats``
    on the held-out NLL, the primary metric; ``fact_beats`` on the fact's)."""
    out = {}
    for a in runs:
        for b in runs:
            if a == b:
                continue
            entry = {}
            for metric, beats in zip(METRICS, ("beats", "fact_beats"), strict=True):
                if not all(metric in r for m in (a, b) for r in runs[m]):
                    continue  # results from before the metric existed
                ours, theirs = (np.array([r[metric] for r in runs[m]]) for m in (a, b))
                gap = float(theirs.mean() - ours.mean())
                entry[f"{metric}_gain"] = gap
                entry[beats] = bool(gap > 2 * max(ours.std(), theirs.std()))
            out[f"{a} vs {b}"] = entry
    return out
