"""For-Value: values of training samples from one forward pass (docs/design.md, "The math").

``G(x) = sum_t m_t e_t h_t^T`` is never built per training sample: scores run through the
vocabulary-chunked kernels, which need only the label tokens' final hidden states. Every
method is a loop over the engine core's step (engine/core/engine_core.py), the path the server uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from forvalue import kernels

from .config import ERRORS, ValuationConfig
from .core.engine_core import BuildTask, EngineCore, ScoreTask
from .core.request import Request
from .inputs.samples import SampleError, root_of, where_of
from .model.loading import ValuationModel
from .outputs import Finished, LabelStates, TokenValues, Valuation
from .valuation.label_math import gram_is_cheaper, hidden_gram, stack
from .valuation.precondition import Covariance, MomentAccumulator, Preconditioner, resolve_damping
from .valuation.reference import Reference
from .valuation.scoring import ReferenceBuilder, ResidentReference

ROUTES = ("auto", "gram", "outer")
CovarianceSource = Covariance | Sequence[dict] | None


class Valuator:
    """Values training samples against validation samples with a resident model.

    ``loss_on``: "response" (the sample's own label rules) or "all" (every position).
    ``normalize``: "none" (as the paper), "mean" (per label token) or "cosine".
    ``precondition``: None (the paper's value) or "input": ``<G(a) P, G(b)>`` with
    ``P = (A + lambda I)^-1``; ``A`` comes from the validation side (``reference``,
    ``pairwise``), the samples themselves (``self_value``) or ``covariance`` (samples or a
    Covariance), and ``damping`` sets lambda (default 0.01 for the validation side, 0.1 for
    ``covariance`` or ``self_value``'s own samples).
    ``errors``: "raise" (a bad sample raises SampleError) or "collect" (its value is NaN and
    methods return ``(values, errors)``); each method can override it.
    The other options (``batch_tokens``, ``max_length``, ...) are ValuationConfig's; or pass a
    whole ``config``.
    """

    def __init__(self, model: ValuationModel, loss_on: str | None = None, normalize: str | None = None, *,
                 config: ValuationConfig | None = None, covariance: CovarianceSource = None,
                 errors: str = "raise", progress: bool = True, **options: Any) -> None:
        named = {key: value for key, value in (("loss_on", loss_on), ("normalize", normalize))
                 if value is not None}
        self.config = (config or ValuationConfig()).replace(**named, **options)
        self.core = EngineCore(model, self.config)
        self.model = model = self.core.model  # with the skip readout, when asked for
        self.math = self.core.math
        self._last_resident: ResidentReference | None = None
        self.errors = _check_errors(errors)
        self.progress = progress
        if covariance is not None and self.config.precondition is None:
            raise ValueError("covariance= is an option of precondition='input'")
        self._covariance_source = covariance
        self._covariance: Covariance | None = covariance if isinstance(covariance, Covariance) else None
        if self._covariance is not None:
            self._covariance.check_compatible(model.identity, self.config.loss_on)

    @property
    def loss_on(self) -> str:
        return self.config.loss_on

    @property
    def normalize(self) -> str:
        return self.config.normalize

    # ----------------------------------------------------------------- public API

    def reference(self, samples: Sequence[dict], *, errors: str | None = None) -> Any:
        """Build the Reference (sum and count of ``G(b)``) of a validation set."""
        failures: list[SampleError] = []
        builder = ReferenceBuilder(self.math, self.normalize, self.loss_on,
                                   self.config.precondition, self._damping(own_side=True),
                                   self._external_covariance(errors))
        for _ in self._steps(samples, errors, failures, "reference", lambda: BuildTask(builder)):
            pass
        return self._result(errors, failures, builder.finish(skipped=len(failures)))

    def score(self, samples: Sequence[dict], reference: Reference, *, token_values: bool = False,
              errors: str | None = None) -> Any:
        """``<G(a), Gbar>`` (``<G(a) P, Gbar>`` preconditioned) per training sample (numpy
        float64, NaN for collected errors); with ``token_values=True`` also a list of
        TokenValues (None for bad samples)."""
        reference.check_compatible(self.model.identity, self.normalize, self.config.precondition,
                                   self.config.damping)
        task = ScoreTask(self._resident(reference))
        failures: list[SampleError] = []
        values = np.full(len(samples), np.nan)
        tokens: list[TokenValues | None] = [None] * len(samples)
        for step in self._steps(samples, errors, failures, "score", lambda: task):
            for item in step:
                values[item.request.index] = item.value
                if token_values:
                    tokens[item.request.index] = TokenValues.of(item.states, item.token_scores)
        return self._result(errors, failures, values, *([tokens] if token_values else []))

    def score_result(self, samples: Sequence[dict], reference: Reference, *,
                     token_values: bool = False) -> Valuation:
        """``score`` as one Valuation (values, errors, and token values when asked for)."""
        values, *tokens, errors = self.score(samples, reference, token_values=token_values, errors="collect")
        return Valuation(values, errors, tokens[0] if tokens else None)

    def pairwise_result(self, train: Sequence[dict], valid: Sequence[dict], *,
                        route: str = "auto") -> Valuation:
        """``pairwise`` as one Valuation (an error names its sample and side)."""
        return Valuation(*self.pairwise(train, valid, route=route, errors="collect"))

    def self_value_result(self, samples: Sequence[dict]) -> Valuation:
        """``self_value`` as one Valuation."""
        return Valuation(*self.self_value(samples, errors="collect"))

    def _resident(self, reference: Reference) -> ResidentReference:
        """``Gbar`` (or ``Gbar P``) of ``reference`` on the device, kept for the next call with
        the same reference (building it is a ``V x d`` copy, more with a preconditioner)."""
        if self._last_resident is None or self._last_resident.reference is not reference:
            self._last_resident = ResidentReference(reference, self.math)
        return self._last_resident

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
            pre = self._preconditioner(cols, errors, own_side=True)
            norms = [self.math.norms(side, self.normalize, pre) for side in (rows, cols)]
            raw = self._pairwise_raw(self._in_space(rows, pre), self._in_space(cols, pre), route,
                                     self.math.head(pre))
            raw /= np.outer(*norms)
            matrix[np.ix_([s.index for s in rows], [s.index for s in cols])] = raw
        return self._result(errors, failures, matrix)

    def self_value(self, samples: Sequence[dict], *, errors: str | None = None) -> Any:
        """``v(x, x) = ||G(x)||^2`` per sample (normalised like every other value)."""
        failures: list[SampleError] = []
        values = np.full(len(samples), np.nan)
        states = self._all_states(samples, errors, failures, "self-value")
        if states:
            pre = self._preconditioner(states, errors, own_side=False)
            norms = self.math.norms(states, self.normalize, pre)
            for item, norm in zip(states, norms, strict=True):
                values[item.index] = self.math.squared_norm(item, pre) / norm ** 2
        return self._result(errors, failures, values)

    def covariance(self, samples: Sequence[dict], *, errors: str | None = None) -> Any:
        """``sum h h^T`` over the label-predicting states of ``samples`` (a Covariance to save
        and share: ``Valuator(..., precondition="input", covariance=it)``)."""
        failures: list[SampleError] = []
        moments = MomentAccumulator(self.model.hidden_size, self.model.device)
        for step in self._steps(samples, errors, failures, "covariance"):
            for item in step:
                moments.add(item.states.hidden, item.states.sample.input_ids, item.states.sample.label_mask)
        if moments.tokens == 0:
            raise ValueError("no valid sample to build a covariance from")
        return self._result(errors, failures, moments.covariance(self.model.identity, self.loss_on))

    def label_states(self, samples: Sequence[dict], *, errors: str | None = None) -> Any:
        """Each sample's label states (the hidden states predicting its labels, and the
        labels), in sample order; None in a collected bad sample's slot."""
        failures: list[SampleError] = []
        out: list[LabelStates | None] = [None] * len(samples)
        for states in self._all_states(samples, errors, failures, "forward"):
            out[states.index] = states
        return self._result(errors, failures, out)

    def each_label_states(self, samples: Sequence[dict],
                          failures: list[SampleError]) -> Iterator[list[LabelStates]]:
        """The label states of each forward step's finished samples, as they finish (for a pass
        too large to hold: an index build); bad samples are appended to ``failures``."""
        for step in self._steps(samples, "collect", failures, "forward"):
            yield [item.states for item in step]

    # ------------------------------------------------------------ forward passes

    def _steps(self, samples: Sequence[dict], errors: str | None, failures: list[SampleError], desc: str,
               task: Any = lambda: None) -> Iterator[list[Finished]]:
        """Admit every sample, then step to completion; yields each step's finished requests.
        Bad samples raise or are collected into ``failures``."""
        mode = _check_errors(errors or self.errors)
        core = self.core
        core.reset()
        if self.model.tokenizer is None and any(_needs_tokenizer(s) for s in samples):
            raise ValueError("the model was loaded without a tokenizer; pass tokenizer= to "
                             "load_model or give pre-tokenised samples")
        root = root_of(samples)
        for index, sample in enumerate(samples):
            try:
                encoded = core.encode(sample, where=where_of(samples, index), index=index, root=root)
            except SampleError as error:
                if mode == "raise":
                    raise
                failures.append(error)
                continue
            core.add_request(Request(encoded, index=index, task=task()))
        for step in core.run_to_completion(progress=self.progress, desc=desc):
            for request, reason in step.failed:
                error = SampleError(reason, sample_id=request.sample.id, where=request.sample.where,
                                    index=request.index)
                if mode == "raise":
                    raise error
                failures.append(error)
            if step.finished:
                yield step.finished

    def _all_states(self, samples: Sequence[dict], errors: str | None, failures: list[SampleError],
                    desc: str) -> list[LabelStates]:
        return [item.states for step in self._steps(samples, errors, failures, desc) for item in step]

    def _result(self, errors: str | None, failures: list[SampleError], *outputs: Any) -> Any:
        if (errors or self.errors) == "collect":
            return (*outputs, failures)
        return outputs[0] if len(outputs) == 1 else outputs

    # ------------------------------------------------------------ preconditioning

    def _damping(self, own_side: bool) -> float | None:
        """The configured damping, else the default of where ``A`` comes from."""
        from_pool = not own_side or self._covariance_source is not None
        return resolve_damping(self.config.precondition, self.config.damping, from_pool)

    def _external_covariance(self, errors: str | None) -> Covariance | None:
        """The covariance given as samples is built on first use (a forward pass of its own)."""
        if self.config.precondition is None or self._covariance_source is None:
            return None
        if self._covariance is None:
            self._covariance = self.covariance(self._covariance_source, errors="raise")
        return self._covariance

    def _preconditioner(self, own: list[LabelStates], errors: str | None,
                        own_side: bool) -> Preconditioner | None:
        if self.config.precondition is None:
            return None
        damping = self._damping(own_side)
        external = self._external_covariance(errors)
        if external is not None:
            return external.preconditioner(damping)
        moments = MomentAccumulator(self.model.hidden_size, self.model.device)
        for states in own:
            moments.add(states.hidden)
        return Preconditioner(moments.moment_sum, moments.tokens, damping)

    def _in_space(self, states: list[LabelStates], pre: Preconditioner | None) -> list[LabelStates]:
        return [self.math.whiten(s, pre) for s in states]

    # --------------------------------------------------------------- the math

    def _pairwise_raw(self, rows: list[LabelStates], cols: list[LabelStates], route: str,
                      head: torch.Tensor) -> np.ndarray:
        """Raw ``v`` of states in one space: plain, or whitened with the whitened head."""
        train_tokens = sum(len(s.positions) for s in rows)
        d = self.model.hidden_size
        gram_cols = [j for j, s in enumerate(cols) if route == "gram" or (
            route == "auto" and gram_is_cheaper(train_tokens, len(s.positions), d))]
        outer_cols = [j for j in range(len(cols)) if j not in set(gram_cols)]
        raw = np.zeros((len(rows), len(cols)))
        batch_tokens = self.config.batch_tokens
        row_blocks = _token_blocks(rows, batch_tokens)
        for col_block in _token_blocks([cols[j] for j in gram_cols], batch_tokens):
            for row_block in row_blocks:
                raw[np.ix_(row_block, [gram_cols[j] for j in col_block])] = \
                    self._gram_values([rows[i] for i in row_block], [cols[gram_cols[j]] for j in col_block],
                                      head)
        for j in outer_cols:
            gradient = kernels.error_outer(cols[j].hidden, head, cols[j].labels, **self.math.kernel_kwargs())
            for row_block in row_blocks:
                raw[row_block, j] = [float(s.sum()) for s in self.math.token_scores(
                    [rows[i] for i in row_block], gradient, head)]
        return raw

    def _gram_values(self, rows: list[LabelStates], cols: list[LabelStates],
                     head: torch.Tensor) -> np.ndarray:
        """``v(a, b)`` for blocks of samples through the token gram, summed per sample pair."""
        row_hidden, row_labels, row_sizes = stack(rows)
        col_hidden, col_labels, col_sizes = stack(cols)
        gram = kernels.error_gram(row_hidden, row_labels, col_hidden, col_labels, head,
                                  **self.math.kernel_kwargs())
        tokens = gram.mul_(hidden_gram(row_hidden, col_hidden, gram.dtype)).double()
        row_ids = _segment_ids(row_sizes, tokens.device)
        col_ids = _segment_ids(col_sizes, tokens.device)
        per_row = torch.zeros((len(rows), tokens.shape[1]), dtype=tokens.dtype,
                              device=tokens.device).index_add_(0, row_ids, tokens)
        per_pair = torch.zeros((len(rows), len(cols)), dtype=tokens.dtype,
                               device=tokens.device).index_add_(1, col_ids, per_row)
        return per_pair.cpu().numpy()


def _token_blocks(states: list[LabelStates], max_tokens: int) -> list[list[int]]:
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
    return blocks


def _segment_ids(sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                   torch.tensor(sizes, device=device))


def _needs_tokenizer(sample: Any) -> bool:
    return isinstance(sample, dict) and "input_ids" not in sample


def _check_errors(errors: str) -> str:
    if errors not in ERRORS:
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    return errors
