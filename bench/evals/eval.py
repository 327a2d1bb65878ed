"""``forvalue eval``: every method of one task on the same model and samples, in one run.

Each method is timed (wall seconds) and its peak resident memory read, the quality metric
of the task computed, a table printed, ``OUT/results.json`` written (docs/design.md, "Evaluation results")
with the values in ``OUT/values.npz`` and plots: ROC curves, value distributions, time vs AUC.

The methods and their names: bench/evals/methods.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from forvalue.bindings.cli.options import add_valuation_arguments

from ..common import check_methods, machine, results_writer
from . import baselines, metrics
from .downstream import CORRUPTIONS, SELECTORS
from .measure import Measurement, measure
from .methods import LABEL_RULES, METHOD_NAMES, Context, Method, methods_for
from .tasks import SIZES, TASKS, Task, make_task
from .vlm_task import VLM_TASK, make_vlm_task

__all__ = ["METHOD_NAMES", "add_eval_arguments", "evaluate", "run_eval"]

# ------------------------------------------------------------------ metrics


def score_values(task: Task, values: np.ndarray, pairwise: np.ndarray | None = None) -> dict[str, float]:
    """The task's metrics; on mislabel tasks also the paper's per-validation-sample AUC when
    the pairwise values are there."""
    if task.kind == "identification":
        return metrics.identification_metrics(values, task.train_meta("class"), task.valid_meta("class"))
    if task.kind == "mislabeled":
        found = metrics.mislabel_metrics(values, task.train_meta("flipped"))
        if pairwise is not None:
            found.update(metrics.per_class_mislabel_metrics(
                pairwise, task.train_meta("class"), task.train_meta("flipped"), task.valid_meta("class")))
        return found
    return metrics.selection_metrics(values, task.train_meta("clean_label"))


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ------------------------------------------------------------------ running


def evaluate(model: Any, task: Task, methods: list[Method], *, loss_on: str | None = None,
             lora_rank: int = 8, progress: bool = False, repeat: int = 1, damping: float | None = None,
             per_class: str = "all") -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Run ``methods`` on ``task``; per method its metrics and costs, and its values.

    With ``repeat > 1`` every method (the LoRA warm-up and gradients too) runs that many
    rounds; times are the minimum over rounds and memory the maximum, which keeps other load
    on a shared machine out of the numbers as far as it can be.
    """
    ctx = Context(model, task, loss_on or task.loss_on, lora_rank, progress, damping, per_class)
    _warm_up(ctx)
    rounds = []
    for number in range(repeat):
        if repeat > 1:
            print(f" round {number + 1} of {repeat}", flush=True)
        ctx.lora = None
        rounds.append(_run_round(ctx, methods))
    results, values = rounds[-1]
    if repeat > 1:
        results = _merge_rounds([r for r, _ in rounds])
    _check_autograd(ctx, results, values)
    return results, values


def _run_round(ctx: Context, methods: list[Method]) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    results: dict[str, dict] = {}
    values: dict[str, np.ndarray] = {}
    for method in methods:
        if method.uses_lora and ctx.lora is None:
            _lora_gradients(ctx)
        if method.uses_warm:
            ctx.warm_model()  # once per run, reported as the warm-up of every -warm method
        ctx.reference_seconds = None
        with measure() as cost:
            raw = np.asarray(method.run(ctx), dtype=np.float64)
        ctx.raw[method.name], values[method.name] = raw, ctx.reduce(raw)
        cost.seconds += sum(results[s]["seconds"] for s in method.sources)
        cost.cpu_seconds += sum(results[s]["cpu_seconds"] for s in method.sources)
        results[method.name] = _entry(ctx, method, raw, _pairwise_values(ctx, method, raw), cost)
        print(f"  {method.name}: {results[method.name]['seconds']:.1f} s", flush=True)
    return results, values


_TIMES = ("seconds", "cpu_seconds", "own_seconds", "warmup_seconds", "gradient_seconds", "reference_seconds")
_MEMORY = ("peak_mb", "extra_mb", "gpu_peak_mb")


def _merge_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    merged = {}
    for name, entry in rounds[-1].items():
        entry = dict(entry, seconds_rounds=[r[name]["seconds"] for r in rounds])
        for key in _TIMES:
            if key in entry:
                entry[key] = min(r[name][key] for r in rounds)
        for key in _MEMORY:
            if entry.get(key) is not None:
                entry[key] = max(r[name][key] for r in rounds)
        merged[name] = entry
    return merged


def _warm_up(ctx: Context) -> None:
    """Run For-Value once on two samples, so that the first method timed does not pay for lazy
    initialisation or (on CUDA) kernel compilation."""
    valuator = ctx.valuator("all")
    train, valid = ctx.task.train[:2], ctx.task.valid[:1]
    valuator.pairwise(train, valid)
    valuator.score(train, valuator.reference(valid))


def _lora_gradients(ctx: Context) -> None:
    with measure() as cost:
        ctx.lora = baselines.lora_gradients(ctx.model, ctx.task.train, ctx.task.valid,
                                            loss_on=ctx.loss_on, rank=ctx.lora_rank)
    ctx.lora_cost = {"warmup_seconds": ctx.lora.warmup_seconds,
                     "gradient_seconds": ctx.lora.gradient_seconds,
                     "gradient_cpu_seconds": ctx.lora.gradient_cpu_seconds,
                     "peak_mb": cost.peak_mb, "extra_mb": cost.extra_mb,
                     "gpu_peak_mb": cost.gpu_peak_mb}
    print(f"  LoRA warm-up {ctx.lora.warmup_seconds:.1f} s, per-sample gradients "
          f"{ctx.lora.gradient_seconds:.1f} s", flush=True)


def _pairwise_values(ctx: Context, method: Method, raw: np.ndarray) -> np.ndarray | None:
    """The per-pair values a mislabel task's per-class metric needs: those the method gave, or
    (untimed, unless ``ctx.per_class`` is "free") its pairwise twin's."""
    if ctx.task.kind != "mislabeled":
        return None
    if raw.ndim == 2:
        return raw
    if method.pairwise is None or ctx.per_class == "free":
        return None
    return np.asarray(method.pairwise(ctx), dtype=np.float64)


def _entry(ctx: Context, method: Method, raw: np.ndarray, pairwise: np.ndarray | None,
           cost: Measurement) -> dict[str, Any]:
    entry: dict[str, Any] = {**score_values(ctx.task, ctx.reduce(raw), pairwise)}
    entry.update(seconds=cost.seconds, cpu_seconds=cost.cpu_seconds, peak_mb=cost.peak_mb,
                 extra_mb=cost.extra_mb, gpu_peak_mb=cost.gpu_peak_mb, group=method.group,
                 loss_on=method.loss_on or ctx.loss_on,
                 values="pairwise" if raw.ndim == 2 else "reference")
    if ctx.reference_seconds is not None:  # of the seconds: building the validation reference
        entry.update(reference_seconds=ctx.reference_seconds)
    if method.uses_warm:
        entry.update(warmup_seconds=ctx.warm_seconds)
    if method.uses_lora:
        # The per-sample gradients are computed once and shared; a user running this method
        # alone pays for them, so they count in its seconds (the warm-up is reported apart).
        entry.update(own_seconds=cost.seconds, seconds=cost.seconds + ctx.lora_cost["gradient_seconds"],
                     cpu_seconds=cost.cpu_seconds + ctx.lora_cost["gradient_cpu_seconds"],
                     warmup_seconds=ctx.lora_cost["warmup_seconds"],
                     gradient_seconds=ctx.lora_cost["gradient_seconds"],
                     peak_mb=max(cost.peak_mb, ctx.lora_cost["peak_mb"]),
                     gpu_peak_mb=_max_or_none(cost.gpu_peak_mb, ctx.lora_cost["gpu_peak_mb"]),
                     extra_mb=max(cost.extra_mb, ctx.lora_cost["extra_mb"]))
    return entry


def _max_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


def _check_autograd(ctx: Context, results: dict[str, dict], values: dict[str, np.ndarray]) -> None:
    """The autograd baseline computes For-Value's number: record how far apart they are."""
    exact = f"forvalue-{ctx.loss_on}"
    if "autograd-lastlayer" in values and exact in values:
        results["autograd-lastlayer"]["max_rel_diff_vs_forvalue"] = _relative_difference(
            values["autograd-lastlayer"], values[exact])
    for loss_on in LABEL_RULES:
        pair, ref = f"forvalue-pairwise-{loss_on}", f"forvalue-{loss_on}"
        if pair in values and ref in values:
            results[pair]["max_rel_diff_vs_reference"] = _relative_difference(values[pair], values[ref])


# --------------------------------------------------------------------- output


def format_table(result: dict[str, Any]) -> str:
    """The printed table: metric mean +- std, wall seconds and peak memory per method."""
    kind = result["kind"]
    metric = {"identification": "AUC", "mislabeled": "AUC(-v, flipped)", "selection": "AUC(v, clean)"}[kind]
    second = {"identification": "recall@n", "mislabeled": "flipped@n", "selection": "clean@0.1"}[kind]
    lines = [f"task {result['task']} ({result['size']}, {result['n_train']} train x {result['n_valid']} "
             f"valid), model {result['model']}, device {result['device']}",
             f"{'method':28s} {'loss_on':9s} {metric:>17s} {second:>16s} {'seconds':>9s} "
             f"{'cpu s':>7s} {'peak MB':>8s}  note"]
    for name, m in result["methods"].items():
        lines.append(f"{name:28s} {m['loss_on']:9s} {m['auc_mean']:9.3f} +- {m['auc_std']:.3f} "
                     f"{_second_metric(m):>16s} {m['seconds']:9.1f} {m['cpu_seconds']:7.1f} "
                     f"{m['peak_mb']:8.0f}  {_note(m)}".rstrip())
    return "\n".join(lines)


def _second_metric(m: dict[str, Any]) -> str:
    if "recall_std" in m:
        return f"{m['recall_mean']:.3f} +- {m['recall_std']:.3f}"
    if "clean_share_0.3" in m:
        return f"{m['recall_mean']:.3f} (0.3: {m['clean_share_0.3']:.2f})"
    return f"{m['recall_mean']:.3f}"


def _note(m: dict[str, Any]) -> str:
    notes = []
    if "warmup_seconds" in m:
        notes.append(f"+ {m['warmup_seconds']:.1f} s warm-up")
    if "max_rel_diff_vs_forvalue" in m:
        notes.append(f"vs forvalue: {m['max_rel_diff_vs_forvalue']:.1e} rel")
    if "max_rel_diff_vs_reference" in m:
        notes.append(f"vs reference: {m['max_rel_diff_vs_reference']:.1e} rel")
    return "; ".join(notes)


def write_outputs(out: Path, result: dict[str, Any], values: dict[str, np.ndarray], task: Task,
                  plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    np.savez_compressed(out / "values.npz", **values)
    if plots:
        from .plots import plot_all

        plot_all(out, result, values, task)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue eval``."""
    parser.add_argument("--task", required=True, choices=[*TASKS, "all", *CORRUPTIONS, "targeted", VLM_TASK],
                        help="the task to run; 'all' runs each text task into OUT/TASK/; 'downstream' "
                             "selects from a noisy pool with several methods, fine-tunes on each "
                             "selection and tests on held-out questions (--seeds seeds); "
                             "'downstream-facts' the same with wrong facts as the corruption; "
                             "'targeted' selects for each target kind among six (bench/evals/targeted.py); "
                             f"'{VLM_TASK}' the image mislabel task (bench/evals/vlm_task.py) on an "
                             "image-text model")
    parser.add_argument("--per-class", choices=("all", "free"), default="all",
                        help="mislabel tasks: the per-class AUC for every method (all: reference-route "
                             "methods also run pairwise, untimed) or only where it comes free")
    parser.add_argument("--seeds", type=int, default=3, help="downstream: seeds from --seed on (default: 3)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods (default: all that apply): {', '.join(METHOD_NAMES)}; "
                             f"downstream tasks: {', '.join(SELECTORS)}")
    parser.add_argument("--model", default=None,
                        help="embedded name or local model folder (default: smollm2-135m; for "
                             f"{VLM_TASK}, the small VLM of bench/evals/vlm_model.py, built once)")
    parser.add_argument("--size", default="small", choices=SIZES)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task generator")
    parser.add_argument("--loss-on", default=None, choices=LABEL_RULES,
                        help="objective of the official code and gradient baselines "
                             "(default: the task's: all for identification, response otherwise)")
    parser.add_argument("--lora-rank", type=int, default=8)
    add_valuation_arguments(parser, "eval")  # --damping of the preconditioned methods
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every method; times are the minimum over rounds")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``forvalue eval``; returns the results (``{"model", "tasks": {...}}`` for 'all')."""
    from forvalue.engine import load_model

    names = [n.strip() for n in args.methods.split(",") if n.strip()] if args.methods else None
    args.model = args.model or _default_model(args.task)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    if args.task in CORRUPTIONS:
        return _run_downstream(model, args, names, out)
    if args.task == "targeted":
        from .targeted import run_from_args

        return run_from_args(model, args, names, out)
    if args.task != "all":
        return _run_task(model, args, args.task, names, out)
    tasks = {name: _run_task(model, args, name, names, out / name) for name in TASKS}
    return {"model": args.model, "tasks": tasks}


def _default_model(task: str) -> str:
    if task != VLM_TASK:
        return "smollm2-135m"
    from .vlm_model import build_vlm

    return str(build_vlm())


def _run_task(model: Any, args: argparse.Namespace, name: str, names: list[str] | None,
              out: Path) -> dict[str, Any]:
    images = name == VLM_TASK
    task = make_vlm_task(args.size, args.seed) if images else make_task(name, args.size, args.seed)
    methods = methods_for(task, names, images=images)
    print(f"{name} ({args.size}): {len(task.train)} train, {len(task.valid)} valid, "
          f"{len(methods)} methods", flush=True)
    load_before = os.getloadavg()[0]
    results, values = evaluate(model, task, methods, loss_on=args.loss_on, lora_rank=args.lora_rank,
                               progress=args.progress, repeat=args.repeat, damping=args.damping,
                               per_class=args.per_class)
    result = {"task": name, "model": args.model, "methods": results, "kind": task.kind,
              "size": args.size, "seed": args.seed, "n_train": len(task.train),
              "n_valid": len(task.valid), "loss_on": args.loss_on or task.loss_on,
              "repeat": args.repeat, "damping": args.damping, "device": str(model.device),
              "dtype": str(model.dtype).replace("torch.", ""),
              "threads": _threads(), "machine": machine(),
              "load_average": [load_before, os.getloadavg()[0]]}
    print(format_table(result), flush=True)
    write_outputs(out, result, values, task, plots=not args.no_plots)
    return result


def _run_downstream(model: Any, args: argparse.Namespace, names: list[str] | None,
                    out: Path) -> dict[str, Any]:
    from .downstream import DOWNSTREAM_SIZES, run_downstream

    check_methods(names, SELECTORS, "downstream")
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"{args.task} ({args.size}: pool, valid, held-out, steps = {DOWNSTREAM_SIZES[args.size]}), "
          f"seeds {seeds}", flush=True)
    write = results_writer(out / "results.json", {"task": args.task, "model": args.model, "size": args.size,
                                                  "seeds": seeds, "device": str(model.device)})

    def write_done(found: dict[str, Any]) -> dict[str, Any]:
        return write({"seeds_done": len(next(iter(found["runs"].values()))), **found})

    result = write_done(run_downstream(model, args.size, seeds, lora_rank=args.lora_rank,
                                       methods=tuple(names or SELECTORS), on_seed=write_done,
                                       corruption=CORRUPTIONS[args.task]))
    for name, m in result["methods"].items():
        print(f"{name:34s} nll {m['nll_mean']:.3f} +- {m['nll_std']:.3f}  exact {m['exact_match_mean']:.2f}"
              f"  fact nll {m['fact_nll_mean']:.3f} +- {m['fact_nll_std']:.3f}"
              f"  clean {m['clean_share_mean']:.2f}", flush=True)
    if not args.no_plots:
        from .plots import plot_downstream

        plot_downstream(out / "downstream.png", result)
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m forvalue.bench.evals.eval", description=__doc__)
    add_eval_arguments(parser)
    run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    main()
