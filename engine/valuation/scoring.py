"""References at work: a reference ready to score against (its matrix on the model's device),
and a builder that accumulates one from validation label states, step by step.

Both are used the same way by the offline Valuator and by the serving engine, through the
core's step (engine/core/engine_core.py), so that a value means the same thing on either path.
"""

from __future__ import annotations

import torch

from ..outputs import LabelStates
from .label_math import LabelMath
from .precondition import Covariance, MomentAccumulator, Preconditioner
from .reference import OWN_SAMPLES, Reference


class ResidentReference:
    """``Gbar`` (or ``Gbar P``) on the model's device, built once, and how to normalise."""

    def __init__(self, reference: Reference, math: LabelMath) -> None:
        self.reference = reference
        self.math = math
        self.preconditioner = reference.preconditioner()
        mean = reference.mean().to(device=math.model.device, dtype=math.dtype)
        # Gbar P: computed in float64 a block of rows at a time, stored in the scoring dtype.
        self.matrix = mean if self.preconditioner is None else self.preconditioner.apply(mean)

    @property
    def normalize(self) -> str:
        return self.reference.normalize

    def token_scores(self, batch: list[LabelStates]) -> list[torch.Tensor]:
        """Each sample's normalised ``s_t`` (float64, CPU): ``<G(a), Gbar P> = sum_t s_t``."""
        per_token = self.math.token_scores(batch, self.matrix)
        norms = self.math.norms(batch, self.normalize, self.preconditioner)
        return [scores / norm for scores, norm in zip(per_token, norms, strict=True)]


class ReferenceBuilder:
    """Accumulates ``sum_b G(b) / norm(b)`` (and ``sum h h^T`` when preconditioned).

    ``covariance``: an external covariance (its ``P`` normalises at once), or None for ``A``
    from these samples. Cosine with its own ``A`` needs ``A`` before any norm: the states are
    held until ``finish`` (a validation set's label states, ``tokens x d``).
    """

    def __init__(self, math: LabelMath, normalize: str, loss_on: str, precondition: str | None = None,
                 damping: float | None = None, covariance: Covariance | None = None) -> None:
        self.math = math
        self.normalize = normalize
        self.loss_on = loss_on
        self.precondition = precondition
        self.damping = damping
        self.covariance = covariance
        model = math.model
        self.gradient_sum = torch.zeros(model.head_weight.shape, dtype=math.dtype, device=model.device)
        self.count = 0
        self.moments = MomentAccumulator(model.hidden_size, model.device)
        self._held: list[LabelStates] = []
        self._preconditioner: Preconditioner | None = None
        if precondition is not None and covariance is not None:
            covariance.check_compatible(model.identity, loss_on)
            self._preconditioner = covariance.preconditioner(damping)

    @property
    def _own_moments(self) -> bool:
        return self.precondition is not None and self.covariance is None

    def add(self, batch: list[LabelStates]) -> None:
        if self._own_moments:
            for states in batch:
                self.moments.add(states.hidden, states.sample.input_ids, states.sample.label_mask)
            if self.normalize == "cosine":
                self._held.extend(batch)
                return
        self._accumulate(batch)

    def finish(self, skipped: int = 0) -> Reference:
        """The reference; raises ValueError when no sample was added."""
        if self.count == 0 and not self._held:
            raise ValueError(f"no valid validation sample to build a reference from ({skipped} skipped)")
        if self._held:
            self._preconditioner = self._own_preconditioner()
            held, self._held = self._held, []
            self._accumulate(held)
        info = {"loss_on": self.loss_on, "skipped": str(skipped)}
        if self.precondition is None:
            return Reference(self.gradient_sum.cpu(), self.count, self.normalize,
                             dict(self.math.model.identity), info)
        if self.covariance is not None:
            source, moment_sum, tokens = self.covariance.fingerprint, self.covariance.moment_sum, \
                self.covariance.tokens
        else:
            source, moment_sum, tokens = OWN_SAMPLES, self.moments.moment_sum.cpu(), self.moments.tokens
        preconditioner = self._preconditioner or Preconditioner(moment_sum, tokens, self.damping)
        info["effective_rank"] = str(preconditioner.effective_rank)
        return Reference(self.gradient_sum.cpu(), self.count, self.normalize,
                         dict(self.math.model.identity), info, self.precondition, self.damping,
                         moment_sum, tokens, source)

    def _own_preconditioner(self) -> Preconditioner:
        if self.moments.tokens == 0:
            raise ValueError("the covariance set has no label token")
        return Preconditioner(self.moments.moment_sum, self.moments.tokens, self.damping)

    def _accumulate(self, batch: list[LabelStates]) -> None:
        weights = [1.0 / norm for norm in self.math.norms(batch, self.normalize, self._preconditioner)]
        self.gradient_sum += self.math.gradient_sum(batch, weights)
        self.count += len(batch)
