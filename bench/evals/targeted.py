"""``forvalue eval --task targeted``: select for a target among many kinds of data, fine-tune on
the selection, test on the target's held-out questions.

Per seed the pool of bench/evals/targeted_task.py (six kinds of short chats, 30% of each
corrupted) and, in turn, each target kind's clean validation chats. Every method selects
``BUDGET`` of the pool by its values against the target's validation chats (``top``; a
``-round-robin`` suffix: the validation chats take their best in turn); ``random`` selects at
random, ``pool`` takes the whole pool, and ``ceiling`` selects at random among the clean chats
of the target kind (it reads the ground truth: not a method, the bound a perfect targeted
filter reaches). A LoRA fine-tune of the model then runs ``STEPS[size]`` steps on each
selection (the same for every method) and is scored on the target's held-out chats: the exact
match of the greedy answer (primary) and the mean NLL of the right answers. Method A "beats"
B on a target when the mean of the paired per-seed differences exceeds twice their standard
deviation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forvalue.bench.common import check_methods, results_writer

from .downstream import draw
from .methods import METHODS, Context
from .targeted_task import KINDS, POOL, TARGETS, TargetedTask, make_targeted
from .tasks import Task

BUDGET = 0.05
STEPS = {"small": 12, "full": 24}  # fine-tuning steps of batch 4 on every selection
VALUED = ("forvalue-response-precond-valid-cosine-skip", "forvalue-response", "lora-less", "rds-plus")
ROUND_ROBIN = "-round-robin"
SELECTORS = (*VALUED, *(m + ROUND_ROBIN for m in VALUED), "random", "pool", "ceiling")
METRICS = {"exact_match": 1, "nll": -1}  # higher is better (1) or lower (-1)


def choose(model: Any, task: TargetedTask, target: str, method: str, seed: int, lora_rank: int,
           cache: dict[str, Any]) -> list[int]:
    """Indices of the pool samples ``method`` keeps for ``target``. ``cache``: what one seed's
    methods share across targets (LESS's training gradients are computed once per seed)."""
    n = len(task.pool)
    budget = max(1, round(BUDGET * n))
    if method == "pool":
        return list(range(n))
    if method == "random":
        return draw(list(range(n)), budget, f"random/{seed}/{target}")
    if method == "ceiling":
        clean = [i for i, s in enumerate(task.pool)
                 if s["meta"]["kind"] == target and s["meta"]["clean_label"]]
        return draw(clean, budget, f"ceiling/{seed}/{target}")
    name = method.removesuffix(ROUND_ROBIN)
    found = next(m for m in METHODS if m.name == name)
    ctx = Context(model, Task("targeted", "selection", task.pool, task.valid[target], loss_on="response"),
                  loss_on="response", lora_rank=lora_rank, progress=False)
    if found.uses_lora:
        ctx.lora = target_gradients(model, task, target, lora_rank, cache)
    if method.endswith(ROUND_ROBIN):
        from forvalue.engine.valuation.ranking import round_robin

        pairs = found.pairwise(ctx) if found.pairwise is not None else found.run(ctx)
        return sorted(round_robin(np.asarray(pairs), budget))
    values = ctx.reduce(np.asarray(found.run(ctx)))
    return sorted(np.argsort(-values, kind="stable")[:budget].tolist())


def target_gradients(model: Any, task: TargetedTask, target: str, lora_rank: int,
                     cache: dict[str, Any]) -> Any:
    """The LoRA gradients of the pool and of ``target``'s validation chats: one warm-up and one
    pass over the pool per seed, every target's validation chats taken with them."""
    from . import baselines

    if "lora" not in cache:
        valid = [chat for t in TARGETS for chat in task.valid[t]]
        cache["lora"] = baselines.lora_gradients(model, task.pool, valid, loss_on="response", rank=lora_rank)
    first = sum(len(task.valid[t]) for t in TARGETS[:TARGETS.index(target)])
    grads = cache["lora"]
    return replace(grads, valid=grads.valid[first:first + len(task.valid[target])])


def fine_tune_and_test(model: Any, chats: list[dict], held_out: list[dict], steps: int, seed: int,
                       lora_rank: int) -> dict[str, float]:
    """LoRA for ``steps`` steps on ``chats``, then the held-out chats' exact match and NLL."""
    from forvalue.engine.inputs.samples import encode_sample
    from forvalue.engine.warmup import label_nll, lora_copy, train_lora

    def encode(samples: list[dict]) -> list[Any]:
        return [encode_sample(s, model.tokenizer, where=f"chat {i}", context_length=model.context_length)
                for i, s in enumerate(samples)]

    lora = lora_copy(model, rank=lora_rank, seed=seed)
    with torch.enable_grad():
        train_lora(model, lora, encode(chats), steps=steps, lr=1e-3, seed=seed)
    with torch.no_grad():
        encoded = encode(held_out)
        nll = float(torch.cat([label_nll(model, lora.backbone, encoded[i:i + 8])
                               for i in range(0, len(encoded), 8)]).mean())
        exact = float(np.mean([greedy_answer(model, lora, s) == s["messages"][-1]["content"]
                               for s in held_out]))
    return {"exact_match": exact, "nll": nll}


def greedy_answer(model: Any, lora: Any, chat: dict) -> str:
    """The fine-tuned model's greedy reply to the chat without its last (assistant) message,
    up to the end of its turn or line."""
    from forvalue.engine.inputs.chat import render

    tokenizer = model.tokenizer
    text = render(tokenizer, chat["messages"][:-1], prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    limit = len(tokenizer(chat["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) + 4
    output = lora.peft_model.generate(input_ids=torch.tensor([prompt], device=model.device),
                                      attention_mask=torch.ones((1, len(prompt)), dtype=torch.long,
                                                                device=model.device),
                                      max_new_tokens=limit, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True).strip().split("\n")[0].strip()


def run_targeted(model: Any, size: str, seeds: list[int], methods: tuple[str, ...] = SELECTORS,
                 lora_rank: int = 8,
                 on_seed: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every method for every target on every seed; ``on_seed`` gets the summary so far after
    each seed (a long run loses nothing when cut)."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {t: {m: [] for m in methods} for t in TARGETS}
    for seed in seeds:
        task, cache = make_targeted(size, seed), {}
        for target in TARGETS:
            for method in methods:
                start = time.perf_counter()
                chosen = choose(model, task, target, method, seed, lora_rank, cache)
                selected = time.perf_counter() - start
                meta = [task.pool[i]["meta"] for i in chosen]
                metrics = fine_tune_and_test(model, [task.pool[i] for i in chosen], task.held_out[target],
                                             STEPS[size], seed, lora_rank)
                runs[target][method].append({
                    **metrics, "target_share": float(np.mean([m["kind"] == target for m in meta])),
                    "clean_share": float(np.mean([m["clean_label"] for m in meta])),
                    "select_seconds": selected, "seconds": time.perf_counter() - start})
                print(f"  seed {seed} {target} {method}: exact {metrics['exact_match']:.2f}, "
                      f"nll {metrics['nll']:.3f}, target {runs[target][method][-1]['target_share']:.2f}, "
                      f"clean {runs[target][method][-1]['clean_share']:.2f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        if on_seed is not None:
            on_seed(summary(runs))
    return summary(runs)


def summary(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    """Per target and method the mean and std of each number; per target the pairwise
    comparisons (paired over seeds) on each metric."""
    means = {t: {m: {f"{k}_{s}": float(getattr(np, s)([r[k] for r in rs]))
                     for k in rs[0] for s in ("mean", "std")}
                 for m, rs in by_method.items() if rs} for t, by_method in runs.items()}
    return {"methods": means, "runs": runs, "comparisons": {t: compare(by) for t, by in runs.items()}}


def compare(by_method: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """``A vs B``: per metric, the mean paired gain of A over B (in the metric's better
    direction) and whether it exceeds twice the paired differences' std (``beats``)."""
    out = {}
    for a, ours in by_method.items():
        for b, theirs in by_method.items():
            if a == b or not ours or len(ours) != len(theirs):
                continue
            entry = {}
            for metric, sign in METRICS.items():
                gains = sign * (np.array([r[metric] for r in ours]) - np.array([r[metric] for r in theirs]))
                entry[f"{metric}_gain"] = float(gains.mean())
                entry[f"{metric}_beats"] = bool(len(gains) > 1 and gains.mean() > 2 * gains.std(ddof=1))
            out[f"{a} vs {b}"] = entry
    return out


def run_from_args(model: Any, args: Any, names: list[str] | None, out: Path) -> dict[str, Any]:
    """``forvalue eval --task targeted``: ``--seeds`` seeds from ``--seed``, ``--methods`` among
    ``SELECTORS``; results.json rewritten after every seed."""
    check_methods(names, SELECTORS, "targeted")
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"targeted ({args.size}: {POOL[args.size]} chats of each of {len(KINDS)} kinds, targets "
          f"{', '.join(TARGETS)}, {STEPS[args.size]} steps), seeds {seeds}", flush=True)
    header = {"task": "targeted", "model": args.model, "size": args.size, "seeds": seeds, "budget": BUDGET,
              "steps": STEPS[args.size]}
    write = results_writer(out / "results.json", header)
    result = write(run_targeted(model, args.size, seeds, tuple(names or SELECTORS), args.lora_rank, write))
    for target, by_method in result["methods"].items():
        for name, m in by_method.items():
            print(f"{target:9s} {name:58s} exact {m['exact_match_mean']:.2f} +- {m['exact_match_std']:.2f}  "
                  f"nll {m['nll_mean']:.3f}  target {m['target_share_mean']:.2f}  "
                  f"clean {m['clean_share_mean']:.2f}", flush=True)
    return result
