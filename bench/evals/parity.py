"""The official code's approximations of For-Value, for parity runs (offline only).

The official implementation materialises, per sample, ``R = sum_t e_t[V'] h_t^T`` over a
vocabulary subset ``V'`` (softmax normalised over the full vocabulary first) and values a
pair by ``<R_a, R_b>`` over the ids both subsets share. The exact value is ``V' = V``.

- ``total_unique``: ``V'`` = the sorted unique input ids of the train and validation samples.
- ``topk_unique k``: ``V'`` = the union of each label position's top-k predictions. The
  official code takes this union over a whole batch, which makes values depend on batching;
  here it is taken per sample. As there, the label's +1 is dropped when the label is not in
  ``V'``.
- ``lowest_likelihood_ratio r``: training samples keep the ``ceil(r n)`` label positions (at
  least 1) of lowest label probability; validation samples keep all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from forvalue import kernels
from forvalue.engine.outputs import LabelStates
from forvalue.engine.valuator import Valuator

VOCABULARIES = ("full", "total_unique", "topk_unique")


@dataclass(frozen=True)
class SubsetGradient:
    """``R`` of one sample: rows ``ids`` (sorted) of its output-layer gradient."""

    ids: torch.Tensor  # (k,) int64, sorted
    rows: torch.Tensor  # (k, d)


def official_values(valuator: Valuator, train: Sequence[dict], valid: Sequence[dict], *,
                    vocabulary: str = "total_unique", top_k: int = 5,
                    lowest_likelihood_ratio: float | None = None) -> np.ndarray:
    """``(n_train, n_valid)`` float64 values as the official code computes them (with the
    valuator's ``errors="collect"``, also the list of errors, like every Valuator method)."""
    _check_options(valuator, vocabulary, top_k, lowest_likelihood_ratio)
    failures: list = []
    rows = valuator._all_states(train, None, failures, "train")
    cols = valuator._all_states(valid, None, failures, "valid")
    shared = _shared_vocabulary(valuator, rows + cols, vocabulary)
    subsets = _Subsets(valuator, shared, top_k)
    valid_gradients = [subsets.gradient(s, keep_ratio=None) for s in cols]
    values = np.full((len(train), len(valid)), np.nan)
    for a in rows:
        gradient = subsets.gradient(a, keep_ratio=lowest_likelihood_ratio)
        for b, other in zip(cols, valid_gradients, strict=True):
            values[a.index, b.index] = _shared_inner_product(gradient, other)
    return valuator._result(None, failures, values)


def _check_options(valuator: Valuator, vocabulary: str, top_k: int, ratio: float | None) -> None:
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {VOCABULARIES}, got {vocabulary!r}")
    if vocabulary == "topk_unique" and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"lowest_likelihood_ratio must lie in (0, 1], got {ratio}")
    if valuator.normalize != "none":
        raise ValueError("the official approximations are unnormalised: use normalize='none'")


def _shared_vocabulary(valuator: Valuator, states: list[LabelStates], vocabulary: str) -> torch.Tensor | None:
    """The one ``V'`` of every sample (None for top-k, whose subsets are per sample)."""
    device = valuator.model.device
    if vocabulary == "full":
        return torch.arange(valuator.model.vocab_size, device=device)
    if vocabulary == "total_unique":
        ids = sorted({i for s in states for i in s.sample.input_ids})
        return torch.tensor(ids, device=device)
    return None


class _Subsets:
    """Builds ``R`` for a sample on the shared vocabulary or its own top-k union."""

    def __init__(self, valuator: Valuator, shared: torch.Tensor | None, top_k: int) -> None:
        model = valuator.model
        self.W = model.head_weight
        self.transform = model.transform
        self.kwargs = valuator.math.kernel_kwargs()
        self.shared = shared
        self.top_k = top_k

    def gradient(self, states: LabelStates, keep_ratio: float | None) -> SubsetGradient:
        hidden, labels = states.hidden, states.labels
        lse, label_logit = kernels.vocab_logsumexp(hidden, self.W, labels, **self.kwargs)
        if keep_ratio is not None:
            keep = max(1, math.ceil(keep_ratio * len(labels)))
            lowest = torch.argsort(label_logit - lse)[:keep]  # lowest label probability first
            hidden, labels, lse = hidden[lowest], labels[lowest], lse[lowest]
        ids = self.shared if self.shared is not None else _topk_union(
            hidden, self.W, self.transform, self.top_k)
        return SubsetGradient(ids, self._rows(hidden, labels, lse, ids))

    def _rows(self, hidden: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
        """``sum_t e_t[ids] h_t^T`` with the full-vocabulary softmax: the logits of the ``ids``
        columns alone, as there (the head and bias restricted to ``ids``)."""
        bias = self.transform.bias
        subset = replace(self.transform, bias=None if bias is None else bias[ids])
        rows = []
        for chunk in kernels.logit_chunks(hidden, self.W[ids], **subset.kwargs()):
            # onehot restricted to ids: a label outside the subset loses its +1, like the official code.
            onehot = labels[:, None] == ids[None, chunk.start:chunk.stop]
            dtype = chunk.logits.dtype
            errors = (onehot.to(dtype) - torch.exp(chunk.logits - lse[:, None].to(dtype))) * chunk.slope
            rows.append(errors.T @ hidden.to(dtype))
        return torch.cat(rows)


def _topk_union(hidden: torch.Tensor, W: torch.Tensor, transform: kernels.LogitTransform,
                k: int) -> torch.Tensor:
    """Sorted union of every position's top-k predicted ids, chunked over the vocabulary."""
    values, ids = [], []
    for chunk in kernels.logit_chunks(hidden, W, **transform.kwargs()):
        best, local = chunk.logits.topk(min(k, chunk.stop - chunk.start), dim=1)
        values.append(best)
        ids.append(local + chunk.start)
    # Each chunk's top k holds the overall top k's members from that chunk.
    candidates = torch.cat(values, dim=1)
    order = candidates.topk(min(k, candidates.shape[1]), dim=1).indices
    return torch.unique(torch.cat(ids, dim=1).gather(1, order))


def _shared_inner_product(a: SubsetGradient, b: SubsetGradient) -> float:
    if a.ids is b.ids:
        return float((a.rows.double() * b.rows.double()).sum())
    in_b = torch.isin(a.ids, b.ids)
    in_a = torch.isin(b.ids, a.ids)
    # Both id lists are sorted, so the shared ids line up row for row.
    return float((a.rows[in_b].double() * b.rows[in_a].double()).sum())
