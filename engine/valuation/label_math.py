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
        """``||G(x)||^2 = v(x, x)`` (``v_P`` with a preconditioner) by the token gram or the
        ``V x d`` matrix, whichever costs less; computed once and kept on ``states``."""
        if states.squared_norm is None:
            white, weight = self.whiten(states, pre), self.head(pre)
            hidden, labels = white.hidden, white.labels
            if gram_is_cheaper(len(labels), len(labels), self.model.hidden_size):
                gram = kernels.error_gram(hidden, labels, hidden, labels, weight, **self.kernel_kwargs())
                products = gram.double() * hidden_gram(hidden, hidden, torch.float64)
                states.squared_norm = float(products.sum())
            else:
                gradient = kernels.error_outer(hidden, weight, labels, **self.kernel_kwargs())
                states.squared_norm = float(gradient.double().square().sum())
        return states.squared_norm

    def norm(self, states: LabelStates, normalize: str, pre: Preconditioner | None = None) -> float:
        """The divisor of ``G(x)`` under ``normalize``: 1, the label count or ``||G(x)||``."""
        if normalize == "mean":
            return float(len(states.positions))
        if normalize == "cosine":
            return self.squared_norm(states, pre) ** 0.5
        return 1.0


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


def hidden_gram(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return a.to(dtype) @ b.to(dtype).T
