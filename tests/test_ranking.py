"""The one ROC AUC (engine/valuation/ranking.py) against a brute-force count of pairs, and its refusals;
round-robin selection against a plain loop."""

import math

import numpy as np
import pytest

from forvalue.engine.valuation.ranking import roc_auc, round_robin


def pair_count(scores, positives):
    """Share of (positive, negative) pairs the positive wins, ties counting one half."""
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    won = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return won / (len(pos) * len(neg))


def test_hand_computed():
    # Positives {2, 3} against negatives {1, 2}: 2>1, 2=2 (half), 3>1, 3>2 -> 3.5 of 4 pairs.
    assert roc_auc([1.0, 2.0, 2.0, 3.0], [False, True, False, True]) == 0.875
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert roc_auc([5.0, 5.0, 5.0], [True, False, False]) == 0.5
    assert roc_auc([3.0, 2.0, 1.0], [True, False, False]) == 1.0


@pytest.mark.parametrize(("scores", "positives"), [
    ([5.0, 5.0, 5.0, 5.0], [True, False, True, False]),  # all tied: one half
    ([1.0, 2.0, 2.0, 3.0], [False, True, False, True]),
    ([3.0, 2.0, 1.0], [True, False, False]),
    ([-math.inf, 0.0, math.inf, math.inf], [False, True, True, False]),  # infinities rank
])
def test_ties_and_infinities_match_the_pair_count(scores, positives):
    assert roc_auc(scores, positives) == pytest.approx(pair_count(scores, positives), abs=1e-12)


def test_random_scores_with_many_ties_match_the_pair_count():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 4, 15).astype(float)
        positives = rng.random(15) < 0.4
        if 0 < positives.sum() < 15:
            assert roc_auc(scores, positives) == pytest.approx(pair_count(scores, positives), abs=1e-12)


@pytest.mark.parametrize(("scores", "positives", "message"), [
    ([1.0, 2.0], [True, True], "one positive and one negative"),
    ([1.0, 2.0], [False, False], "one positive and one negative"),
    ([], [], "one positive and one negative"),
    ([1.0, math.nan], [True, False], "NaN"),
    ([1.0, 2.0], [True], "one length"),
])
def test_undefined_aucs_are_refused(scores, positives, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(scores, positives)


def _round_robin_reference(values: np.ndarray, count: int) -> list[int]:
    """Columns in turn, each taking its largest remaining row (the first on ties)."""
    columns = [j for j in range(values.shape[1]) if not np.isnan(values[:, j]).all()]
    remaining = [i for i in range(values.shape[0]) if not np.isnan(values[i, columns]).any()]
    taken = []
    while len(taken) < count:
        for j in columns:
            if len(taken) == count:
                break
            best = max(remaining, key=lambda i: (values[i, j], -i))
            taken.append(best)
            remaining.remove(best)
    return taken


@pytest.mark.parametrize("seed", range(5))
def test_round_robin_equals_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(1, 30), rng.integers(1, 6)
    values = rng.integers(-3, 4, (rows, cols)).astype(float)  # many ties
    if rows > 2:
        values[rng.integers(rows)] = np.nan  # a failed training sample
        values[rng.integers(rows), rng.integers(cols)] = np.nan
    if cols > 1:
        values[:, rng.integers(cols)] = np.nan  # a failed validation sample
    usable = int((~np.isnan(values[:, ~np.isnan(values).all(axis=0)]).any(axis=1)).sum())
    for count in {0, 1, usable // 2, usable}:
        assert round_robin(values, count) == _round_robin_reference(values, count)


def test_round_robin_serves_every_validation_sample():
    # Rows 0-3 are best for column 0 and good for column 1; top by mean takes only them.
    values = np.array([[9, 5], [8, 5], [7, 5], [6, 5], [0, 6], [0, 4]], dtype=float)
    assert sorted(np.argsort(-values.mean(axis=1), kind="stable")[:2]) == [0, 1]
    assert round_robin(values, 2) == [0, 4]
    with pytest.raises(ValueError, match="cannot take 7 of 6"):
        round_robin(values, 7)
    with pytest.raises(ValueError, match="no validation sample has values"):
        round_robin(np.full((3, 2), np.nan), 1)
