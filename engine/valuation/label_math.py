"""For-Value's math on the label states of a batch of samples (docs/design.md, "The math"),
shared by the offline Valuator and the serving engine. Each operation is one kernel call for
the whole batch; ``G(x) = sum_t e_t h_t^T`` is built only where a ``V x d`` result is wanted.

The preconditioned value runs the same routes on whitened states ``h' = C^-1 h`` with the
whitened head ``W' = W C`` (engine/valuation/precondition.py), which leave every ``e_t`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from forvalue import kernels

from ..model.loading import ValuationModel
from ..outputs import LabelStates
from .precondition import Preconditioner


class LabelMath:
    """The kernels of one model, with its logit transform and the chosen backend."""

    def __init__(self, model: ValuationModel, backend: kernels.Backend = "auto") -> None:
        self.model = model
        self.backend = backend
        # Gradients and scores accumulate in fp32, or fp64 for an fp64 model.
        self.dtype = torch.float64 if model.dtype == torch.float64 else torch.float32

    def kernel_kwargs(self) -> dict[str, Any]:
        return {**self.model.transform.kwargs(), "backend": self.backend}

    def head(self, pre: Preconditioner | None = None) -> torch.Tensor:
        """``W``, or ``W' = W C`` for a preconditioner (built once, kept by the preconditioner)."""
        return self.model.head_weight if pre is None else pre.whiten_head(self.model.head_weight)

    def whiten(self, states: LabelStates, pre: Preconditioner | None) -> LabelStates:
        """The states in the preconditioner's space (a copy; the same object without one)."""
        if pre is None:
            return states
        return replace(states, hidden=pre.whiten(states.hidden), squared_norm=None)

    def token_scores(self, states: list[LabelStates], matrix: torch.Tensor,
                     head: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``s_t = e_t^T M h_t`` per label token (``M``: a mean gradient, preconditioned or
        not), float64 on the CPU, one tensor per sample. ``head``: ``W``, or ``W'`` for
        whitened states."""
        hidden, labels, sizes = stack(states)
        head = self.model.head_weight if head is None else head
        scores = kernels.reference_score(hidden, head, labels, matrix, **self.kernel_kwargs())
        return list(scores.double().cpu().split(sizes))

    def gradient_sum(self, states: list[LabelStates], weights: Sequence[float],
                     pre: Preconditioner | None = None) -> torch.Tensor:
        """``sum_b w_b G(b)``, ``(V, d)`` in ``self.dtype``; ``G'(b)`` on whitened states."""
        hidden, labels, sizes = stack(states)
        token_weights = torch.repeat_interleave(torch.tensor(weights, dtype=self.dtype),
                                                torch.tensor(sizes)).to(hidden.device)
        gradient = kernels.error_outer(hidden, self.head(pre), labels, token_weights,
                                       **self.kernel_kwargs())
        return gradient.to(self.dtype)

    def squared_norm(self, states: LabelStates, pre: Preconditioner | None = None) -> float:
        """``||G(x)||^2 = v(x, x)`` (``v_P`` with a preconditioner); computed once and kept on
        ``states``."""
        return self.squared_norms([states], pre)[0]

    def squared_norms(self, batch: list[LabelStates], pre: Preconditioner | None = None) -> list[float]:
        """``||G(x)||^2`` of each sample. Short samples go together through one token gram
        (its diagonal blocks): each vocabulary chunk of the head is then read once per group,
        not once per sample; a sample too long for its gram runs alone through ``G(x)``."""
        todo = [s for s in batch if s.squared_norm is None]
        width = todo[0].hidden.shape[1] if todo else 0
        for group in token_groups(todo, budget=width // 2):
            white = [self.whiten(s, pre) for s in group]
            if len(group) == 1 and not gram_is_cheaper(len(group[0].labels), len(group[0].labels), width):
                gradient = kernels.error_outer(white[0].hidden, self.head(pre), white[0].labels,
                                               **self.kernel_kwargs())
                group[0].squared_norm = float(gradient.double().square().sum())
                continue
            hidden, labels, sizes = stack(white)
            gram = kernels.error_gram(hidden, labels, hidden, labels, self.head(pre), **self.kernel_kwargs())
            products = gram.double() * hidden_gram(hidden, hidden, torch.float64)
            for states, block in zip(group, diagonal_blocks(products, sizes), strict=True):
                states.squared_norm = float(block.sum())
        return [s.squared_norm for s in batch]

    def norms(self, batch: list[LabelStates], normalize: str,
              pre: Preconditioner | None = None) -> list[float]:
        """The divisor of ``G(x)`` under ``normalize`` for each sample: 1, the label count or
        ``||G(x)||``."""
        if normalize == "mean":
            return [float(len(s.positions)) for s in batch]
        if normalize == "cosine":
            return [n ** 0.5 for n in self.squared_norms(batch, pre)]
        return [1.0] * len(batch)


def gram_is_cheaper(train_tokens: int, valid_tokens: int, hidden_size: int) -> bool:
    """Whether ``v`` against one validation sample costs less through the token gram than
    through ``G(b)``. Marginal cost: token gram ``Ta Tb V + Tb V d``, against building ``G(b)``
    (``2 Tb V d``) and scoring every training token against it (``2 Ta V d``); V cancels."""
    return train_tokens * valid_tokens + valid_tokens * hidden_size \
        < 2 * valid_tokens * hidden_size + 2 * train_tokens * hidden_size


def stack(states: list[LabelStates]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The label tokens of several samples, one after another, and each sample's count."""
    sizes = [len(s.positions) for s in states]
    return torch.cat([s.hidden for s in states]), torch.cat([s.labels for s in states]), sizes


def token_groups(batch: list[LabelStates], budget: int) -> list[list[LabelStates]]:
    """Consecutive samples in groups of at most ``budget`` label tokens (a longer sample
    alone): the group's gram, ``budget^2 V``, stays below half its logits' ``budget V d``."""
    groups: list[list[LabelStates]] = []
    tokens = 0
    for states in batch:
        size = len(states.positions)
        if not groups or tokens + size > budget:
            groups.append([])
            tokens = 0
        groups[-1].append(states)
        tokens += size
    return groups


def diagonal_blocks(matrix: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [matrix[end - size:end, end - size:end] for size, end in zip(sizes, ends, strict=True)]


def hidden_gram(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return a.to(dtype) @ b.to(dtype).T
