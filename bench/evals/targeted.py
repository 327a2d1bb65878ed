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

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forvalue.bench.common import check_methods, results_writer

from .downstream import draw
from .finetuned import fine_tune, held_out_scores
from .methods import METHODS, Context
from .targeted_task import KINDS, POOL, TARGETS, TargetedTask, make_targeted
from .tasks import Task

BUDGET = 0.05
STEPS = {"small": 12, "full": 24}  # fine-tuning steps of batch 4 on every selection
VALUED = ("forvalue-response-precond-valid-cosine-skip", "forvalue-response", "lora-less", "rds-plus")
ROUND_ROBIN = "-round-robin"
SELECTORS = (*VALUED, *(m + ROUND_ROBIN for m in VALUED), "random", "pool", "ceiling")
# select's default read from an index of the pool built once per seed (run when named: item 4
# of the comparison, one pool pass for every target, beside the exact default's selections)
INDEX = "index"
# select's default on the model after a one-epoch LoRA warm-up on the pool (once per seed): does
# a backward pass close what the forward pass alone misses (wrong answers of the right form)?
WARM = VALUED[0] + "-warm"
# relevance from the base model, quality from the warmed one: the warmed values rank only the
# SHORTLIST budgets the cold default values highest (the warm-up alone loses the target's kind)
WARM_IN_COLD = WARM + "-in-cold"
SHORTLIST = 3
# the cold and the warmed default's values added (LESS's sum over checkpoints, with two)
COLD_PLUS_WARM = VALUED[0] + "-cold-plus-warm"
# the whole pool for as many epochs as a selection gets (about 20 times the steps): an ungated
# reference, the cost a selection saves
EQUAL_EPOCHS = "pool-equal-epochs"
WHOLE_POOL = ("pool", EQUAL_EPOCHS)
OPTIONAL = (INDEX, INDEX + ROUND_ROBIN, WARM, WARM + ROUND_ROBIN, WARM_IN_COLD, WARM_IN_COLD + ROUND_ROBIN,
            COLD_PLUS_WARM, COLD_PLUS_WARM + ROUND_ROBIN, EQUAL_EPOCHS)
# Values of a pair that do not depend on the other validation chats (no preconditioner from
# them): LESS's training gradients are the warm-up's, the same for every target.
PER_PAIR = ("forvalue-response", "lora-less", "rds-plus")
BY_MAX = ("rds-plus",)  # RDS+ scores a pool sample by its best cosine over the target's samples
HEADLINE = VALUED[0]  # select's default, top: the method the comparison is about, fixed before any run
OVER_TARGETS = "mean over targets"
METRICS = {"exact_match": 1, "nll": -1}  # higher is better (1) or lower (-1)


def choose(model: Any, task: TargetedTask, target: str, method: str, seed: int, lora_rank: int,
           cache: dict[Any, Any]) -> list[int]:
    """Indices of the pool samples ``method`` keeps for ``target``. ``cache``: what one seed's
    methods share across targets (LESS's training gradients are computed once per seed)."""
    n = len(task.pool)
    budget = budget_of(n)
    if method in WHOLE_POOL:
        return list(range(n))
    if method == "random":
        return draw(list(range(n)), budget, f"random/{seed}/{target}")
    if method == "ceiling":
        clean = [i for i, s in enumerate(task.pool)
                 if s["meta"]["kind"] == target and s["meta"]["clean_label"]]
        return draw(clean, budget, f"ceiling/{seed}/{target}")
    values = method_values(model, task, target, method.removesuffix(ROUND_ROBIN), lora_rank, cache)
    if method.endswith(ROUND_ROBIN):
        from forvalue.engine.valuation.ranking import round_robin

        return sorted(round_robin(values, budget))
    top = values.max(axis=1) if method.startswith(BY_MAX) else values.mean(axis=1)
    return sorted(highest(top, budget).tolist())


def budget_of(pool_size: int) -> int:
    return max(1, round(BUDGET * pool_size))


def highest(scores: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` highest scores, the earlier first among ties."""
    return np.argsort(-scores, kind="stable")[:count]


def method_values(model: Any, task: TargetedTask, target: str, name: str, lora_rank: int,
                  cache: dict[Any, Any]) -> np.ndarray:
    """The pool's values against each of ``target``'s validation chats, ``(pool, valid)``,
    computed once for both strategies. ``top`` ranks by their mean, which is the value against
    the validation set as a whole (For-Value's reference and LESS's score are linear in the
    validation side; the cosine divides each validation gradient by its norm first), or, for
    RDS+, by their max, as its authors aggregate. A method whose value for a pair does not
    depend on the other validation chats runs once per seed against every target's chats."""
    if name == INDEX:
        return index_values(model, task, target, cache)
    if name == WARM_IN_COLD:
        return warm_in_cold_values(model, task, target, lora_rank, cache)
    found = next(m for m in METHODS if m.name == name)
    if found.sources:
        return sum(method_values(model, task, target, source, lora_rank, cache) for source in found.sources)
    shared = name in PER_PAIR
    key = name if shared else (target, name)
    if key not in cache:
        valid = [chat for t in TARGETS for chat in task.valid[t]] if shared else task.valid[target]
        ctx = Context(model, Task("targeted", "selection", task.pool, valid, loss_on="response"),
                      loss_on="response", lora_rank=lora_rank, progress=False)
        if found.uses_lora:
            ctx.lora = lora_gradients(model, task, lora_rank, cache)
        if found.uses_warm:
            ctx.warm = warm_model(model, task, lora_rank, cache)
        cache[key] = np.asarray((found.pairwise or found.run)(ctx))
    return cache[key][:, target_columns(task, target)] if shared else cache[key]


def index_values(model: Any, task: TargetedTask, target: str, cache: dict[Any, Any]) -> np.ndarray:
    """select's default values of the pool against each of ``target``'s validation chats, from
    an index of the pool built once per seed (``forvalue index build`` with its defaults)."""
    import tempfile

    from forvalue.engine import Index

    if INDEX not in cache:
        cache["index-folder"] = tempfile.TemporaryDirectory(prefix="targeted-index-")
        start = time.perf_counter()
        cache[INDEX] = Index.build(task.pool, cache["index-folder"].name, model=model, progress=False)
        cache["index-build-seconds"] = time.perf_counter() - start
    found = cache[INDEX].values(task.valid[target], columns="each")
    values = np.empty_like(found.values)
    values[found.rows] = found.values
    return values


def warm_in_cold_values(model: Any, task: TargetedTask, target: str, lora_rank: int,
                        cache: dict[Any, Any]) -> np.ndarray:
    """The warmed default's values within the cold default's shortlist; -inf elsewhere."""
    cold = method_values(model, task, target, VALUED[0], lora_rank, cache)
    warm = method_values(model, task, target, WARM, lora_rank, cache)
    shortlist = highest(cold.mean(axis=1), SHORTLIST * budget_of(len(task.pool)))
    values = np.full_like(warm, -np.inf)
    values[shortlist] = warm[shortlist]
    return values


def lora_gradients(model: Any, task: TargetedTask, lora_rank: int, cache: dict[Any, Any]) -> Any:
    """The LoRA gradients of the pool and of every target's validation chats: one warm-up and
    one pass over the pool per seed."""
    from . import baselines

    if "lora" not in cache:
        valid = [chat for t in TARGETS for chat in task.valid[t]]
        cache["lora"] = baselines.lora_gradients(model, task.pool, valid, loss_on="response", rank=lora_rank)
    return cache["lora"]


def warm_model(model: Any, task: TargetedTask, lora_rank: int, cache: dict[Any, Any]) -> Any:
    """The model after one warm-up epoch on the pool: one per seed, for every target."""
    if "warm" not in cache:
        pool_only = Task("targeted", "selection", task.pool, [], loss_on="response")
        cache["warm"] = Context(model, pool_only, loss_on="response", lora_rank=lora_rank,
                                progress=False).warm_model()
    return cache["warm"]


def target_columns(task: TargetedTask, target: str) -> slice:
    """``target``'s validation chats among every target's, in TARGETS order."""
    first = sum(len(task.valid[t]) for t in TARGETS[:TARGETS.index(target)])
    return slice(first, first + len(task.valid[target]))


def run_targeted(model: Any, size: str, seeds: list[int], methods: tuple[str, ...] = SELECTORS,
                 lora_rank: int = 8, done: dict[str, Any] | None = None,
                 on_seed: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every method for every target on every seed; ``done``: the ``runs`` of seeds already
    run (they are kept, not rerun); ``on_seed`` gets the summary so far after each seed (a long
    run loses nothing when cut)."""
    runs = done or {t: {m: [] for m in methods} for t in TARGETS}
    for seed in seeds:
        if seed in seeds_in(runs):
            continue
        task, cache = make_targeted(size, seed), {}
        for target in TARGETS:
            for method in methods:
                run = one_run(model, task, target, method, seed, STEPS[size], lora_rank, cache)
                runs[target][method].append(run)
                print(f"  seed {seed} {target} {method}: exact {run['exact_match']:.2f}, "
                      f"nll {run['nll']:.3f}, target {run['target_share']:.2f}, "
                      f"clean {run['clean_share']:.2f} ({run['seconds']:.0f} s)", flush=True)
        if on_seed is not None:
            on_seed(summary(runs))
    return summary(runs)


def one_run(model: Any, task: TargetedTask, target: str, method: str, seed: int, steps: int, lora_rank: int,
            cache: dict[Any, Any]) -> dict[str, float]:
    """Select for ``target`` with ``method``, fine-tune on the selection, test on the target's
    held-out chats. The whole pool's fine-tunes are the same for every target: once per seed."""
    start = time.perf_counter()
    chosen = choose(model, task, target, method, seed, lora_rank, cache)
    selected = time.perf_counter() - start
    if method == EQUAL_EPOCHS:
        steps = round(steps * len(task.pool) / budget_of(len(task.pool)))
    lora = cache.get(method) if method in WHOLE_POOL else None
    if lora is None:
        lora = fine_tune(model, [task.pool[i] for i in chosen], steps, seed, lora_rank)
        if method in WHOLE_POOL:
            cache[method] = lora
    with torch.no_grad():
        metrics = held_out_scores(model, lora, task.held_out[target])
    meta = [task.pool[i]["meta"] for i in chosen]
    built = {"index_build_seconds": cache["index-build-seconds"]} if method.startswith(INDEX) else {}
    return {"seed": seed, **metrics, **built,
            "target_share": float(np.mean([m["kind"] == target for m in meta])),
            "clean_share": float(np.mean([m["clean_label"] for m in meta])),
            "select_seconds": selected, "seconds": time.perf_counter() - start}


def summary(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    """Per target and method the mean and std of each number; per target, and on the mean over
    targets, the pairwise comparisons (paired over seeds) on each metric."""
    means = {t: {m: {f"{k}_{s}": float(getattr(np, s)([r[k] for r in rs]))
                     for k in rs[0] if k != "seed" for s in ("mean", "std")}
                 for m, rs in by_method.items() if rs} for t, by_method in runs.items()}
    comparisons = {t: compare(by) for t, by in runs.items()} | {OVER_TARGETS: compare(over_targets(runs))}
    return {"seeds_done": seeds_in(runs), "methods": means, "runs": runs, "comparisons": comparisons}


def seeds_in(runs: dict[str, dict[str, list[dict[str, float]]]]) -> list[int]:
    """The seeds the runs hold (a seed's runs are written only once all of them are done)."""
    return sorted({r["seed"] for rs in next(iter(runs.values())).values() for r in rs})


def over_targets(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, list[dict[str, float]]]:
    """Per method and seed, each metric's mean over the targets."""
    by_method = next(iter(runs.values()))
    return {m: [{k: float(np.mean([by[m][i][k] for by in runs.values()])) for k in METRICS}
                for i in range(len(rs))] for m, rs in by_method.items()}


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
    check_methods(names, SELECTORS + OPTIONAL, "targeted")
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"targeted ({args.size}: {POOL[args.size]} chats of each of {len(KINDS)} kinds, targets "
          f"{', '.join(TARGETS)}, {STEPS[args.size]} steps), seeds {seeds}", flush=True)
    header = {"task": "targeted", "model": args.model, "size": args.size, "seeds": seeds, "budget": BUDGET,
              "steps": STEPS[args.size], "lora_rank": args.lora_rank}
    methods = tuple(names or SELECTORS)
    prior = earlier_run(out / "results.json", header, methods)
    if prior is not None:
        done = seeds_in(prior["runs"])
        print(f"resuming {out / 'results.json'}: seeds {done} done", flush=True)
        header["seeds"] = sorted({*done, *seeds})
        header["earlier_seconds"] = prior["seconds"] + prior.get("earlier_seconds", 0.0)
    write = results_writer(out / "results.json", header)
    result = write(run_targeted(model, args.size, seeds, methods, args.lora_rank,
                                prior and prior["runs"], write))
    for target, by_method in result["methods"].items():
        for name, m in by_method.items():
            print(f"{target:9s} {name:58s} exact {m['exact_match_mean']:.2f} +- {m['exact_match_std']:.2f}  "
                  f"nll {m['nll_mean']:.3f}  target {m['target_share_mean']:.2f}  "
                  f"clean {m['clean_share_mean']:.2f}", flush=True)
    (out / "table.md").write_text(markdown(result))
    if not args.no_plots:
        from .plots import plot_targeted

        plot_targeted(out / "targeted.png", result)
    return result


def markdown(result: dict[str, Any]) -> str:
    """Held-out exact match per target and method (mean +- std over seeds), its mean over
    targets and the selections' target and clean shares; then the headline (select's default,
    ``top``, fixed before any run) against every other method."""
    by_target = result["methods"]
    targets, methods = list(by_target), list(next(iter(by_target.values())))

    def mean_of(m: str, key: str) -> float:
        return float(np.mean([by_target[t][m][f"{key}_mean"] for t in targets]))

    lines = [f"| method | {' | '.join(targets)} | mean | target share | clean share |",
             "|---" * (len(targets) + 4) + "|"]
    for m in methods:
        cells = [f"{by_target[t][m]['exact_match_mean']:.2f} ± {by_target[t][m]['exact_match_std']:.2f}"
                 for t in targets]
        lines.append(f"| {m} | {' | '.join(cells)} | {mean_of(m, 'exact_match'):.3f} | "
                     f"{mean_of(m, 'target_share'):.2f} | {mean_of(m, 'clean_share'):.2f} |")
    if HEADLINE not in methods:
        return "\n".join(lines) + "\n"
    groups = [*targets, OVER_TARGETS]
    lines += ["", f"{HEADLINE} (top) against each method: the mean paired gain in exact match over "
              "seeds; **beats** / **beaten**: the gain / loss exceeds twice the paired std.", "",
              f"| against | {' | '.join(groups)} |", "|---" * (len(groups) + 1) + "|"]
    for other in methods:
        if other == HEADLINE:
            continue
        cells = []
        for group in groups:
            ours, theirs = (result["comparisons"][group].get(f"{a} vs {b}", {})
                            for a, b in ((HEADLINE, other), (other, HEADLINE)))
            mark = " **beats**" if ours.get("exact_match_beats") else (
                " **beaten**" if theirs.get("exact_match_beats") else "")
            cells.append(f"{ours['exact_match_gain']:+.3f}{mark}" if ours else "-")
        lines.append(f"| {other} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def earlier_run(path: Path, header: dict[str, Any], methods: tuple[str, ...]) -> dict[str, Any] | None:
    """What an earlier run of the same setup and methods left at ``path`` (cut, or with other
    seeds), to resume from; None where there is none. Any other file there is refused, not
    overwritten: hours of fine-tunes may lie in it."""
    if not path.exists():
        return None
    try:
        prior = json.loads(path.read_text())
        runs = prior["runs"]
        seeded = all("seed" in r for by in runs.values() for rs in by.values() for r in rs)
    except (ValueError, KeyError, TypeError, AttributeError):
        prior, runs, seeded = {}, {}, False
    differ = [f"{k} {prior.get(k)!r}, not {v!r}" for k, v in header.items()
              if k != "seeds" and prior.get(k) != v]
    if not differ and any(tuple(runs.get(t, ())) != methods for t in TARGETS):
        differ.append("other methods")
    if differ or not seeded:
        why = "; ".join(differ) if prior else "not a targeted run's results"
        raise SystemExit(f"forvalue eval: {path} holds another run ({why}): choose another --out, "
                         "or move it away")
    return prior
