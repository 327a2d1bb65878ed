"""The one ROC AUC (engine/ranking.py) against a brute-force count of pairs, and its refusals."""

import math

import numpy as np
import pytest

from forvalue.engine.ranking import roc_auc


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
