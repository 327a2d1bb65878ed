"""Quality metrics of data values (higher value = more helpful, for every method)."""

from __future__ import annotations

import numpy as np

from forvalue.engine.valuation.ranking import roc_auc


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    hits = positives[order]
    # One point per distinct score, so tied samples move the curve diagonally.
    last_of_tie = np.r_[np.diff(scores[order]) != 0, True]
    tp = np.cumsum(hits)[last_of_tie]
    fp = np.cumsum(~hits)[last_of_tie]
    tpr = np.r_[0.0, tp / max(1, hits.sum())]
    fpr = np.r_[0.0, fp / max(1, (~hits).sum())]
    return fpr, tpr


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores (ties broken by index, stably)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")[:n]


def per_validation_auc(values: np.ndarray, train_classes: np.ndarray,
                       valid_classes: np.ndarray) -> np.ndarray:
    """ROC AUC of each validation sample's column against the same-class indicator."""
    return np.array([roc_auc(values[:, j], train_classes == c) for j, c in enumerate(valid_classes)])


def recall_at_n(values: np.ndarray, train_classes: np.ndarray, valid_classes: np.ndarray,
                n: int) -> np.ndarray:
    """Share of same-class samples among each validation sample's top ``n`` training samples."""
    return np.array([np.mean(train_classes[top_n(values[:, j], n)] == c)
                     for j, c in enumerate(valid_classes)])


def identification_metrics(values: np.ndarray, train_classes: np.ndarray,
                           valid_classes: np.ndarray) -> dict[str, float]:
    """Mean and std over validation samples of AUC and recall@n, n = training samples per class."""
    n = int(np.round(len(train_classes) / len(np.unique(train_classes))))
    aucs = per_validation_auc(values, train_classes, valid_classes)
    recalls = recall_at_n(values, train_classes, valid_classes, n)
    return {"auc_mean": float(aucs.mean()), "auc_std": float(aucs.std()),
            "recall_mean": float(recalls.mean()), "recall_std": float(recalls.std()), "recall_n": n}


def mislabel_metrics(values: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """AUC of minus the value for finding flipped samples; ``recall_mean``: share of flipped
    samples among the ``n_flipped`` lowest values; clean share of the ``n_clean`` highest."""
    flipped = np.asarray(flipped, dtype=bool)
    n_flipped = int(flipped.sum())
    lowest = top_n(-values, n_flipped)
    highest = top_n(values, len(flipped) - n_flipped)
    return {"auc_mean": roc_auc(-values, flipped), "auc_std": 0.0,
            "recall_mean": float(flipped[lowest].mean()),
            "clean_share_top": float((~flipped[highest]).mean())}


def per_class_mislabel_metrics(pairwise: np.ndarray, train_classes: np.ndarray, flipped: np.ndarray,
                               valid_classes: np.ndarray) -> dict[str, float]:
    """The official code's mislabel metric: per validation sample, the AUC of its column of
    values for the clean training samples of its class (against every other training
    sample); mean and std over validation samples."""
    clean = ~np.asarray(flipped, dtype=bool)
    aucs = np.array([roc_auc(pairwise[:, j], (train_classes == c) & clean)
                     for j, c in enumerate(valid_classes)])
    return {"per_class_auc_mean": float(aucs.mean()), "per_class_auc_std": float(aucs.std())}


def clean_share(values: np.ndarray, clean: np.ndarray, ratio: float) -> float:
    """Share of clean samples among the ``round(ratio n)`` (at least 1) highest values."""
    count = max(1, round(ratio * len(values)))
    return float(np.asarray(clean, dtype=bool)[top_n(values, count)].mean())


SELECTION_RATIOS = (0.1, 0.3)


def selection_metrics(values: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """Clean share of the selection at each ratio (``recall_mean``: at 0.1), and the AUC of
    the value for the clean label."""
    shares = {f"clean_share_{r}": clean_share(values, clean, r) for r in SELECTION_RATIOS}
    return {"auc_mean": roc_auc(values, clean), "auc_std": 0.0,
            "recall_mean": shares[f"clean_share_{SELECTION_RATIOS[0]}"], **shares,
            "clean_share_all": float(np.mean(clean))}
