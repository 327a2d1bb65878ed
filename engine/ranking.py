"""How well values rank a set of samples: the one ROC AUC of the demo and the benchmarks.

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
