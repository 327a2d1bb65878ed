"""For-Value: values of training samples from one forward pass (DESIGN.md section 1).

``G(x) = sum_t m_t e_t h_t^T`` is never built per training sample: scores run through the
vocabulary-chunked kernels, which need only the label tokens' final hidden states.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forvalue import kernels

from .forward import LabelStates, label_states
from .label_math import LabelMath, gram_is_cheaper, hidden_gram, stack
from .model import ValuationModel
from .reference import NORMALIZATIONS, Reference
from .samples import LOSS_ON, SampleError, encode_samples

ROUTES = ("auto", "gram", "outer")


@dataclass(frozen=True)
class TokenValues:
    """Per-token contributions ``s_t`` of one sample; they sum to its value."""

    positions: np.ndarray  # token positions k of the labels
    token_ids: np.ndarray  # the label tokens
    values: np.ndarray  # float64, normalised like the sample's value


class Valuator:
    """Values training samples against validation samples with a resident model.

    ``loss_on``: "response" (the sample's own label rules) or "all" (every position).
    ``normalize``: "none" (as the paper), "mean" (per label token) or "cosine".
    ``errors``: "raise" (a bad sample raises SampleError) or "collect" (its value is NaN and
    methods return ``(values, errors)``); each method can override it.
    """

    def __init__(self, model: ValuationModel, loss_on: str = "response", normalize: str = "none", *,
                 append_eos: bool = False, max_length: int | None = None, batch_tokens: int = 4096,
                 backend: kernels.Backend = "auto", errors: str = "raise",
                 progress: bool = True) -> None:
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.model = model
        self.loss_on = loss_on
        self.normalize = normalize
        self.errors = _check_errors(errors)
        self.batch_tokens = batch_tokens
        self.math = LabelMath(model, backend)
        self.progress = progress
        self._encode_options = {"loss_on": loss_on, "append_eos": append_eos,
                                "max_length": max_length, "context_length": model.context_length}

    # ----------------------------------------------------------------- public API

    def reference(self, samples: Sequence[dict], *, errors: str | None = None) -> Any:
        """Build the Reference (sum and count of ``G(b)``) of a validation set."""
        failures: list[SampleError] = []
        total = torch.zeros(self.model.head_weight.shape, dtype=self.math.dtype, device=self.model.device)
        count = 0
        for batch in self._batches(samples, errors, failures, "reference"):
            total += self.math.gradient_sum(batch, [1.0 / self._norm(s) for s in batch])
            count += len(batch)
        if count == 0:
            raise ValueError("no valid validation sample to build a reference from")
        info = {"loss_on": self.loss_on, "skipped": str(len(failures))}
        ref = Reference(total.cpu(), count, self.normalize, dict(self.model.identity), info)
        return self._result(errors, failures, ref)

    def score(self, samples: Sequence[dict], reference: Reference, *, token_values: bool = False,
              errors: str | None = None) -> Any:
        """``<G(a), Gbar>`` per training sample (numpy float64, NaN for collected errors);
        with ``token_values=True`` also a list of TokenValues (None for bad samples)."""
        reference.check_compatible(self.model.identity, self.normalize)
        mean_gradient = reference.mean().to(device=self.model.device, dtype=self.math.dtype)
        failures: list[SampleError] = []
        values = np.full(len(samples), np.nan)
        tokens: list[TokenValues | None] = [None] * len(samples)
        for batch in self._batches(samples, errors, failures, "score"):
            per_token = self.math.token_scores(batch, mean_gradient)
            for states, token_scores in zip(batch, per_token, strict=True):
                token_scores = token_scores / self._norm(states)
                values[states.index] = float(token_scores.sum())
                if token_values:
                    tokens[states.index] = _token_values(states, token_scores)
        return self._result(errors, failures, values, *([tokens] if token_values else []))

    def pairwise(self, train: Sequence[dict], valid: Sequence[dict], *, route: str = "auto",
                 errors: str | None = None) -> Any:
        """``v(a, b)`` for every pair, numpy float64 ``(n_train, n_valid)``.

        ``route`` picks, per validation sample, the token gram (cost ~ Ta Tb V) or building
        ``G(b)`` and scoring against it (cost ~ Ta V d); "auto" takes the cheaper.
        """
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        failures: list[SampleError] = []
        rows = self._all_states(train, errors, failures, "train")
        cols = self._all_states(valid, errors, failures, "valid")
        matrix = np.full((len(train), len(valid)), np.nan)
        if rows and cols:
            raw = self._pairwise_raw(rows, cols, route)
            raw /= np.outer([self._norm(s) for s in rows], [self._norm(s) for s in cols])
            matrix[np.ix_([s.index for s in rows], [s.index for s in cols])] = raw
        return self._result(errors, failures, matrix)

    def self_value(self, samples: Sequence[dict], *, errors: str | None = None) -> Any:
        """``v(x, x) = ||G(x)||^2`` per sample (normalised like every other value)."""
        failures: list[SampleError] = []
        values = np.full(len(samples), np.nan)
        for batch in self._batches(samples, errors, failures, "self-value"):
            for states in batch:
                values[states.index] = self.math.squared_norm(states) / self._norm(states) ** 2
        return self._result(errors, failures, values)

    # ------------------------------------------------------------ forward passes

    def _batches(self, samples: Sequence[dict], errors: str | None, failures: list[SampleError],
                 desc: str) -> Iterator[list[LabelStates]]:
        """Encoded, forwarded samples, one forward batch at a time; bad samples raise or are
        collected into ``failures``."""
        mode = _check_errors(errors or self.errors)
        if self.model.tokenizer is None and any(_needs_tokenizer(s) for s in samples):
            raise ValueError("the model was loaded without a tokenizer; pass tokenizer= to "
                             "load_model or give pre-tokenised samples")
        encoded, bad = encode_samples(samples, self.model.tokenizer, errors=mode,
                                      **self._encode_options)
        failures.extend(bad)
        for batch in label_states(self.model, encoded, batch_tokens=self.batch_tokens,
                                  progress=self.progress, desc=desc):
            good = [item for item in batch if isinstance(item, LabelStates)]
            for item in batch:
                if isinstance(item, SampleError):
                    if mode == "raise":
                        raise item
                    failures.append(item)
            if good:
                yield good

    def _all_states(self, samples: Sequence[dict], errors: str | None, failures: list[SampleError],
                    desc: str) -> list[LabelStates]:
        return [states for batch in self._batches(samples, errors, failures, desc) for states in batch]

    def _result(self, errors: str | None, failures: list[SampleError], *outputs: Any) -> Any:
        if (errors or self.errors) == "collect":
            return (*outputs, failures)
        return outputs[0] if len(outputs) == 1 else outputs

    # --------------------------------------------------------------- the math

    def _norm(self, states: LabelStates) -> float:
        return self.math.norm(states, self.normalize)

    def _pairwise_raw(self, rows: list[LabelStates], cols: list[LabelStates], route: str) -> np.ndarray:
        train_tokens = sum(len(s.positions) for s in rows)
        d = self.model.hidden_size
        gram_cols = [j for j, s in enumerate(cols) if route == "gram" or (
            route == "auto" and gram_is_cheaper(train_tokens, len(s.positions), d))]
        outer_cols = [j for j in range(len(cols)) if j not in set(gram_cols)]
        raw = np.zeros((len(rows), len(cols)))
        row_blocks = _token_blocks(rows, self.batch_tokens)
        for col_block in _token_blocks([cols[j] for j in gram_cols], self.batch_tokens):
            for row_block in row_blocks:
                raw[np.ix_(row_block.members, [gram_cols[j] for j in col_block.members])] = \
                    self._gram_values([rows[i] for i in row_block.members],
                                      [cols[gram_cols[j]] for j in col_block.members])
        for j in outer_cols:
            gradient = kernels.error_outer(cols[j].hidden, self.model.head_weight, cols[j].labels,
                                           **self.math.kernel_kwargs())
            for row_block in row_blocks:
                scores = self.math.token_scores([rows[i] for i in row_block.members], gradient)
                raw[row_block.members, j] = [float(s.sum()) for s in scores]
        return raw

    def _gram_values(self, rows: list[LabelStates], cols: list[LabelStates]) -> np.ndarray:
        """``v(a, b)`` for blocks of samples through the token gram, summed per sample pair."""
        row_hidden, row_labels, row_sizes = stack(rows)
        col_hidden, col_labels, col_sizes = stack(cols)
        gram = kernels.error_gram(row_hidden, row_labels, col_hidden, col_labels,
                                  self.model.head_weight, **self.math.kernel_kwargs())
        tokens = gram.mul_(hidden_gram(row_hidden, col_hidden, gram.dtype)).double()
        row_ids = _segment_ids(row_sizes, tokens.device)
        col_ids = _segment_ids(col_sizes, tokens.device)
        per_row = torch.zeros((len(rows), tokens.shape[1]), dtype=tokens.dtype,
                              device=tokens.device).index_add_(0, row_ids, tokens)
        per_pair = torch.zeros((len(rows), len(cols)), dtype=tokens.dtype,
                               device=tokens.device).index_add_(1, col_ids, per_row)
        return per_pair.cpu().numpy()


@dataclass(frozen=True)
class _Block:
    members: list[int]


def _token_blocks(states: list[LabelStates], max_tokens: int) -> list[_Block]:
    """Consecutive samples grouped so that a block holds at most ``max_tokens`` labels
    (a longer sample gets a block of its own)."""
    blocks: list[list[int]] = []
    size = 0
    for i, s in enumerate(states):
        n = len(s.positions)
        if not blocks or size + n > max_tokens:
            blocks.append([])
            size = 0
        blocks[-1].append(i)
        size += n
    return [_Block(members) for members in blocks]


def _segment_ids(sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                   torch.tensor(sizes, device=device))


def _token_values(states: LabelStates, scores: torch.Tensor) -> TokenValues:
    return TokenValues(np.asarray(states.positions), states.labels.cpu().numpy(),
                       scores.numpy().astype(np.float64))


def _needs_tokenizer(sample: Any) -> bool:
    return isinstance(sample, dict) and "input_ids" not in sample


def _check_errors(errors: str) -> str:
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    return errors
