"""How well values rank a set of samples (the one ROC AUC of the demo and the benchmarks), and
how a selection is drawn from per-target values.

numpy only (no torch), so that light callers can rank without loading the engine's models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def roc_auc(scores: Sequence[float] | np.ndarray, positives: Sequence[bool] | np.ndarray) -> float:
    """Probability that a random positive scores above a random negative, ties counting one
    half (the Mann-Whitney statistic, from average ranks).

    Raises ValueError when the two are not 1-D of one length, when a score is NaN, or when
    there is no positive or no negative (the AUC is undefined then, not 0.5).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.ndim != 1 or scores.shape != positives.shape:
        raise ValueError(f"scores and positives must be 1-D and of one length, got shapes "
                         f"{scores.shape} and {positives.shape}")
    if np.isnan(scores).any():
        raise ValueError("a score is NaN: the AUC needs every sample ranked")
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"the AUC needs at least one positive and one negative, got {n_pos} "
                         f"positive(s) and {n_neg} negative(s)")
    return float((_average_ranks(scores)[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (infinities rank as such)."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def round_robin(values: np.ndarray, count: int) -> list[int]:
    """``count`` rows of ``values`` (training samples x validation samples), taken by the
    columns in turn: each validation sample takes its most valuable training sample not yet
    taken. Unlike the top rows by mean value, which can all serve the few validation samples
    whose errors align most (one kind of question), every validation sample is served.
    Rows with a NaN are never taken; a NaN column (a failed validation sample) takes none.
    Returns the row indices in the order taken."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be (training, validation), got shape {values.shape}")
    columns = np.flatnonzero(~np.isnan(values).all(axis=0))
    usable_rows = ~np.isnan(values[:, columns]).any(axis=1)
    if not 0 <= count <= int(usable_rows.sum()):
        raise ValueError(f"cannot take {count} of {int(usable_rows.sum())} valued training samples")
    if count and not len(columns):
        raise ValueError("no validation sample has values")
    # Each column's rows, best first (ties: the earlier row), unusable rows dropped.
    ranked = [[int(i) for i in np.argsort(-values[:, j], kind="stable") if usable_rows[i]] for j in columns]
    taken: list[int] = []
    seen: set[int] = set()
    cursors = [0] * len(columns)
    while len(taken) < count:
        for k, rows in enumerate(ranked):
            while rows[cursors[k]] in seen:
                cursors[k] += 1
            taken.append(rows[cursors[k]])
            seen.add(rows[cursors[k]])
            if len(taken) == count:
                break
    return taken


def choose(values: np.ndarray, ratio: float, strategy: str, keep: int | None = None) -> list[int]:
    """Positions chosen from values (``(n, 1)`` for top, ``(n, groups)`` for round-robin):
    ``ceil(ratio n)`` of the finite ones, or ``keep`` (at most all)."""
    finite = np.isfinite(values).all(axis=1)
    keep = int(np.ceil(ratio * finite.sum())) if keep is None else min(keep, int(finite.sum()))
    if strategy == "top":
        column = np.where(finite, values[:, 0], -np.inf)
        return [int(i) for i in np.argsort(-column, kind="stable")[:keep]]
    if strategy == "round-robin":
        return round_robin(np.where(finite[:, None], values, -np.inf), keep)
    raise ValueError(f"strategy must be 'top' or 'round-robin', got {strategy!r}")
