"""Plots of one ``forvalue eval`` run: ROC curves, value distributions, time vs AUC."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .tasks import Task

_STYLE = {"exact": ("-", 2.2), "official": ("--", 1.4), "gradient": ("-.", 1.4), "similarity": (":", 1.6)}
_GRID = np.linspace(0, 1, 201)


def _colors(n: int) -> list:
    """tab20's ten dark shades first, then the light ones: neighbours stay distinguishable."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [palette(order[k % 20]) for k in range(n)]


def plot_all(out: Path, result: dict[str, Any], values: dict[str, np.ndarray], task: Task) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    title = f"{result['task']} ({result['size']}), {result['model']} on {result['device']}"
    plot_roc(out / "roc.png", result, values, task, title)
    plot_distributions(out / "distributions.png", values, task, title)
    plot_time_auc(out / "time_auc.png", result, title)


def _positives(task: Task) -> tuple[np.ndarray, str, str]:
    """Per training sample (or pair) what counts as found, and the two groups' names."""
    if task.kind == "identification":
        same = task.train_meta("class")[:, None] == task.valid_meta("class")[None, :]
        return same, "same class", "other class"
    if task.kind == "mislabeled":
        return task.train_meta("flipped").astype(bool), "flipped", "clean"
    return task.train_meta("clean_label").astype(bool), "clean", "corrupted"


def _roc(task: Task, v: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if task.kind == "identification":
        # Vertical average of the per-validation-sample curves (the metric averages their AUCs).
        tprs = [np.interp(_GRID, *metrics.roc_curve(v[:, j], positives[:, j])) for j in range(v.shape[1])]
        return _GRID, np.mean(tprs, axis=0)
    return metrics.roc_curve(-v if task.kind == "mislabeled" else v, positives)


def plot_roc(path: Path, result: dict[str, Any], values: dict[str, np.ndarray], task: Task,
             title: str) -> None:
    import matplotlib.pyplot as plt

    positives, found, _ = _positives(task)
    colors = _colors(len(values))
    fig, ax = plt.subplots(figsize=(7, 6))
    for color, (name, v) in zip(colors, values.items(), strict=False):
        style, width = _STYLE[result["methods"][name]["group"]]
        fpr, tpr = _roc(task, v, positives)
        ax.plot(fpr, tpr, style, lw=width, color=color,
                label=f"{name} ({result['methods'][name]['auc_mean']:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC, finding {found} samples\n{title}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _standardised(task: Task, v: np.ndarray) -> np.ndarray:
    """Identification values are compared within a validation column: z-score each column."""
    if task.kind != "identification":
        return (v - v.mean()) / (v.std() or 1.0)
    return (v - v.mean(axis=0)) / np.where(v.std(axis=0) > 0, v.std(axis=0), 1.0)


def plot_distributions(path: Path, values: dict[str, np.ndarray], task: Task, title: str) -> None:
    import matplotlib.pyplot as plt

    positives, found, other = _positives(task)
    cols = 4
    rows = math.ceil(len(values) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, v) in zip(axes.flat, values.items(), strict=False):
        z = _standardised(task, v)
        bins = np.linspace(z.min(), z.max(), 30) if z.max() > z.min() else 10
        ax.hist(z[~positives], bins=bins, alpha=0.6, density=True, label=other, color="tab:blue")
        ax.hist(z[positives], bins=bins, alpha=0.6, density=True, label=found, color="tab:red")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(values):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    scale = "z-score within each validation sample" if task.kind == "identification" else "z-score"
    fig.suptitle(f"value distributions ({scale})\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_time_auc(path: Path, result: dict[str, Any], title: str) -> None:
    import matplotlib.pyplot as plt

    markers = {"exact": "o", "official": "s", "gradient": "^", "similarity": "D"}
    methods = result["methods"]
    colors = _colors(len(methods))
    fig, ax = plt.subplots(figsize=(8, 5))
    for color, (name, m) in zip(colors, methods.items(), strict=False):
        seconds = max(m["seconds"], 1e-3)  # the log axis cannot show 0
        ax.scatter(seconds, m["auc_mean"], marker=markers[m["group"]], s=60, color=color,
                   label=f"{name} ({m['seconds']:.1f} s)")
        if "warmup_seconds" in m:  # the LoRA warm-up, drawn as the cost on top
            ax.plot([seconds, seconds + m["warmup_seconds"]], [m["auc_mean"]] * 2, color=color, lw=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="wall seconds (log; line: + LoRA warm-up)", ylabel="AUC", title=f"quality vs cost\n{title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_downstream(path: Path, result: dict[str, Any]) -> None:
    """Held-out NLL (lower is better), exact match and the fact's NLL per selection method,
    mean +- std over seeds."""
    import matplotlib.pyplot as plt

    methods = result["methods"]
    panels = [("nll", "held-out NLL of clean answers (lower is better)"),
              ("exact_match", "held-out exact match")]
    if "fact_nll_mean" in next(iter(methods.values())):  # results before the fact metric have none
        panels.append(("fact_nll", "held-out NLL of the stated fact (lower is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        _method_bars(ax, methods, key, label)
    _save(fig, path, f"selection then fine-tuning: {result['size']}, seeds {result['seeds']}, model "
                     f"{result['model']}")


def plot_targeted(path: Path, result: dict[str, Any]) -> None:
    """Per target kind: the held-out exact match after fine-tuning on each method's selection
    (mean +- std over seeds), the share of the selection from the target kind and its clean
    share."""
    import matplotlib.pyplot as plt

    targets = list(result["methods"])
    panels = [("exact_match", "held-out exact match"),
              ("target_share", "share of the selection from the target"),
              ("clean_share", "share of the selection that is clean")]
    fig, axes = plt.subplots(len(panels), len(targets), figsize=(4.2 * len(targets), 2.8 * len(panels) + 1.5),
                             sharey="row", squeeze=False)
    for column, target in enumerate(targets):
        for row, (key, label) in enumerate(panels):
            _method_bars(axes[row][column], result["methods"][target], key, f"{target}: {label}",
                         labelled=row == len(panels) - 1, rotation=60, fontsize=6)
            axes[row][column].set_ylim(0, 1.05)
    _save(fig, path, f"targeted selection ({result['budget']:.0%} of the pool), {result['steps']} LoRA "
                     f"steps: {result['size']}, seeds {result['seeds']}, model {result['model']}")


def _method_bars(ax: Any, methods: dict[str, dict[str, float]], key: str, title: str, labelled: bool = True,
                 rotation: int = 25, fontsize: int = 8) -> None:
    """One bar per method: ``key``'s mean over seeds, its std as the error bar."""
    names = list(methods)
    ax.bar(range(len(names)), [methods[n][f"{key}_mean"] for n in names],
           yerr=[methods[n][f"{key}_std"] for n in names], color=_colors(len(names)), capsize=3)
    ax.set_xticks(range(len(names)), names if labelled else [], rotation=rotation, ha="right",
                  fontsize=fontsize)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _save(fig: Any, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
