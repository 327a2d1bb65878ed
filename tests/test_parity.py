"""The official approximations against a float64 re-implementation of the official formula."""

import math

import numpy as np
import pytest
import torch

from forvalue.bench.evals.parity import official_values
from forvalue.engine import Valuator, load_model

from tiny_models import random_samples, tiny_model


def official_R(hf, sample, vocab_ids, *, top_k=None, ratio=None):
    """Full logits from the model itself, softmax over V, rows restricted to V' (float64)."""
    ids = sample["input_ids"]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    logits, hidden = out.logits[0].double(), out.hidden_states[-1][0].double()
    positions = [k for k, m in enumerate(sample["loss_mask"]) if m and k > 0]
    P = torch.softmax(logits[[k - 1 for k in positions]], dim=-1)
    H = hidden[[k - 1 for k in positions]]
    labels = torch.tensor([ids[k] for k in positions])
    if ratio is not None:
        keep = max(1, math.ceil(ratio * len(positions)))
        order = torch.argsort(P[torch.arange(len(labels)), labels])[:keep]
        P, H, labels = P[order], H[order], labels[order]
    if top_k is not None:
        vocab_ids = sorted(set(P.topk(top_k, dim=1).indices.flatten().tolist()))
    E = -P[:, vocab_ids]
    for t, y in enumerate(labels.tolist()):
        if y in vocab_ids:  # the official code drops the +1 of a label outside V'
            E[t, vocab_ids.index(y)] += 1
    return dict(zip(vocab_ids, (E.T @ H), strict=True))


def pair_value(Ra, Rb):
    return sum(float(Ra[i] @ Rb[i]) for i in Ra.keys() & Rb.keys())


@pytest.fixture(scope="module")
def setup():
    hf = tiny_model("untied", seed=21)
    return hf, Valuator(load_model(hf, dtype=torch.float64), progress=False)


def test_total_unique_matches_official(setup):
    hf, v = setup
    train, valid = random_samples(4, seed=22), random_samples(3, seed=23)
    vocab = sorted({i for s in train + valid for i in s["input_ids"]})
    expected = [[pair_value(official_R(hf, a, vocab), official_R(hf, b, vocab)) for b in valid]
                for a in train]
    np.testing.assert_allclose(official_values(v, train, valid), expected, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5])
def test_topk_unique_matches_official(setup, k):
    hf, v = setup
    train, valid = random_samples(4, seed=24), random_samples(3, seed=25)
    expected = [[pair_value(official_R(hf, a, None, top_k=k), official_R(hf, b, None, top_k=k))
                 for b in valid] for a in train]
    got = official_values(v, train, valid, vocabulary="topk_unique", top_k=k)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_lowest_likelihood_ratio_matches_official(setup):
    hf, v = setup
    train, valid = random_samples(4, seed=26), random_samples(2, seed=27)
    vocab = list(range(97))
    expected = [[pair_value(official_R(hf, a, vocab, ratio=0.3), official_R(hf, b, vocab))
                 for b in valid] for a in train]
    got = official_values(v, train, valid, vocabulary="full", lowest_likelihood_ratio=0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_full_vocabulary_is_the_exact_value(setup):
    _, v = setup
    train, valid = random_samples(3, seed=28), random_samples(2, seed=29)
    np.testing.assert_allclose(official_values(v, train, valid, vocabulary="full"),
                               v.pairwise(train, valid), rtol=1e-9)


def test_bad_options(setup):
    _, v = setup
    s = random_samples(1, seed=30)
    with pytest.raises(ValueError, match="vocabulary"):
        official_values(v, s, s, vocabulary="top5")
    with pytest.raises(ValueError, match="lowest_likelihood_ratio"):
        official_values(v, s, s, lowest_likelihood_ratio=0.0)
