"""What the index stores of a training sample, and the value read back from it
(docs/design.md, "Index").

Per label token ``t`` of a sample: the state ``h_t`` kept whole (``D = d``, or ``2d`` with the
skip readout) and the error sketched over the vocabulary, ``u_t = R^T e_t`` (``R``: ``V x k``,
entries N(0, 1/k), drawn from a seed); per sample, the exact error gram ``g_ts = e_t . e_s``.
Nothing of ``G`` is formed. At query time, with the target's ``P = C^-T C^-1`` and
``z = C^-1 h`` (``z = h`` without a preconditioner):

    <G(a) P, G(b)>      ~  sum_{t in a, s in b} (u_t . u_s)(z_t . z_s)   (E[R R^T] = I: no bias)
    ||G(a) P^(1/2)||^2  =  sum_{t, s in a} g_ts (z_t . z_s)              (exact, for cosine)

``R`` acts on the vocabulary side of ``G`` and ``P`` on the hidden side, so the sketch commutes
with any target's ``P``; the hidden side is never compressed before it is whitened.

A sample of more than ``max_tokens`` label tokens can be stored merged (``merge_tokens``):
``G = E^T H`` is unchanged by any orthonormal basis ``U`` of token space
(``G = (U^T E)^T (U^T H)``), so the tokens are replaced by the ``max_tokens`` directions of
``U`` with the largest error energy (the top eigenvectors of ``g``), which keeps exactly
``G_r = E^T U_r U_r^T H``, the part of ``G`` carried by those directions, under every ``P``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from forvalue import kernels

from ..outputs import LabelStates
from ..valuation.label_math import LabelMath, stack
from ..valuation.precondition import MomentAccumulator, Preconditioner
from .store import IndexMismatch

# Sketch rows: the fewest whose values keep select's default within 0.006 AUC of the exact one
# on the measured tasks (bench/results/index/layouts.md); fewer rows lose up to 0.04.
SKETCH_ROWS = 1024
IDENTITY = 0  # ``rows`` of the identity sketch: u_t = e_t exactly (k = V), for tests and small V


@dataclass(frozen=True)
class Sketch:
    """``R`` (``V x k``) from ``seed``; ``fingerprint`` checks that this torch draws the same."""

    vocab_size: int
    rows: int
    seed: int

    def matrix(self) -> torch.Tensor:
        if self.rows == IDENTITY:
            return torch.eye(self.vocab_size)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.vocab_size, self.rows, generator=generator) / self.rows ** 0.5

    @property
    def width(self) -> int:
        return self.vocab_size if self.rows == IDENTITY else self.rows

    def fingerprint(self, matrix: torch.Tensor) -> str:
        return hashlib.sha256(matrix[:16].contiguous().numpy().tobytes()).hexdigest()[:32]

    def describe(self, matrix: torch.Tensor) -> dict[str, object]:
        kind = "identity" if self.rows == IDENTITY else "gaussian"
        return {"kind": kind, "rows": self.width, "seed": self.seed, "fingerprint": self.fingerprint(matrix)}


def stored_sketch(folder: Path, identity: dict) -> torch.Tensor:
    """An index's ``R``, drawn again from its seed and checked to be the one it was built with."""
    described = identity["sketch"]
    kind_rows = IDENTITY if described["kind"] == "identity" else described["rows"]
    sketch = Sketch(int(identity["vocab_size"]), kind_rows, described["seed"])
    matrix = sketch.matrix()
    if sketch.fingerprint(matrix) != described["fingerprint"]:
        raise IndexMismatch(f"{folder}: this torch ({torch.__version__}) draws another sketch from "
                            f"seed {sketch.seed} than the index was built with: rebuild it")
    return matrix


@dataclass
class Encoded:
    """A batch of samples in the stored form: tokens one sample after another."""

    hidden: torch.Tensor  # (tokens, D)
    errors: torch.Tensor  # (tokens, k): u_t
    gram: torch.Tensor  # (sum of T^2,) float32: each sample's g, row-major
    sizes: list[int]  # label tokens per sample


def encode(states: list[LabelStates], math: LabelMath, sketch: torch.Tensor) -> Encoded:
    """The stored form of a batch's label states (one sketch call for the batch, one error gram
    per sample: ``T^2 V`` each)."""
    hidden, labels, sizes = stack(states)
    head, options = math.model.head_weight, math.kernel_kwargs()
    errors = kernels.error_sketch(hidden, head, labels, sketch.to(hidden), **options)
    grams = [kernels.error_gram(s.hidden, s.labels, s.hidden, s.labels, head, **options).float().reshape(-1)
             for s in states]
    return Encoded(hidden, errors, torch.cat(grams), sizes)


def merge_tokens(hidden: torch.Tensor, errors: torch.Tensor, gram: torch.Tensor,
                 max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One sample's stored tokens merged to at most ``max_tokens`` (returned as they are when
    fewer), and the share of the error energy ``trace(g)`` kept. The merged tokens' gram is
    ``U_r^T g U_r = diag(lambda_r)``; the sketched errors ``U_r^T u`` are what sketching the
    merged errors would give (``R`` is linear), and the hidden side is mixed across tokens
    only, never projected."""
    size = hidden.shape[0]
    if size <= max_tokens:
        return hidden, errors, gram, 1.0
    g = gram.reshape(size, size).double()
    energy, basis = torch.linalg.eigh((g + g.T) / 2)  # ascending
    kept = energy[-max_tokens:].flip(0).clamp_min(0)
    mix = basis[:, -max_tokens:].flip(1).T  # (max_tokens, size): the top directions
    # float32 at least: a merged row's norm can grow to sqrt(size) times a token's
    merged = [(mix @ p.double()).to(torch.promote_types(p.dtype, torch.float32)) for p in (hidden, errors)]
    share = float(kept.sum() / energy.clamp_min(0).sum()) if energy.max() > 0 else 1.0
    return merged[0], merged[1], torch.diag(kept).reshape(-1).to(gram.dtype), share


@dataclass
class Target:
    """What a scan values against: the target's tokens' states moved into the stored side's
    space, ``P h_s`` (so ``z_t . z_s = h_t . P h_s`` needs no whitening of what is stored),
    their sketched errors ``u_s``, and
    ``weights`` (``S x groups``): the weight of token ``s`` in each group's sum
    (``1 / (norm(b) count)`` for a validation set's mean, ``1 / norm(b)`` for one sample's
    own column)."""

    projected: torch.Tensor  # (S, D) float32: P h_s
    errors: torch.Tensor  # (S, k) float32
    weights: torch.Tensor  # (S, groups) float32
    preconditioner: Preconditioner | None
    normalize: str

    @property
    def groups(self) -> int:
        return self.weights.shape[1]

    def values(self, hidden: torch.Tensor, errors: torch.Tensor, gram: torch.Tensor, sizes: list[int],
               norms: torch.Tensor | None = None, counts: list[int] | None = None) -> torch.Tensor:
        """``(samples, groups)`` float64: the stored samples' values against each group.
        ``norms``: the samples' divisors when known (the coarse vectors keep them under the
        pool's ``P``); else computed, which whitens the stored states for cosine. ``counts``:
        the samples' label tokens when some were stored merged (``mean`` divides by them)."""
        h, u = hidden.float(), errors.float()
        S, D, k = self.projected.shape[0], h.shape[1], u.shape[1]
        if self.groups * D * k < S * (D + k):  # per group the k x D matrix M = sum_s w_s u_s (P h_s)^T
            matrices = [(self.errors * w[:, None]).T @ self.projected for w in self.weights.T]
            per_token = torch.stack([((h @ M.T) * u).sum(1) for M in matrices], dim=1)
        else:  # token pairs: (h_t . P h_s)(u_t . u_s), summed over s with each group's weights
            per_token = ((h @ self.projected.T) * (u @ self.errors.T)) @ self.weights
        sample_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        per_sample = torch.zeros((len(sizes), self.groups), dtype=torch.float64)
        per_sample.index_add_(0, sample_of, per_token.double())
        if norms is None:  # cosine's norms need the stored states whitened; none and mean do not
            whiten = self.normalize == "cosine" and self.preconditioner is not None
            norms = sample_norms(self.preconditioner.whiten(h) if whiten else h, gram, sizes, self.normalize,
                                 counts)
        return per_sample / norms[:, None]


def sample_norms(z: torch.Tensor, gram: torch.Tensor, sizes: list[int], normalize: str,
                 counts: list[int] | None = None) -> torch.Tensor:
    """Each sample's divisor under ``normalize`` (float64); cosine's ``sum g_ts (z_t . z_s)``
    from the stored gram and the states padded to the batch's longest sample; ``mean``'s label
    tokens (``counts`` where tokens were merged, else ``sizes``)."""
    if normalize == "none":
        return torch.ones(len(sizes), dtype=torch.float64)
    if normalize == "mean":
        return torch.tensor(sizes if counts is None else counts, dtype=torch.float64)
    padded = torch.nn.utils.rnn.pad_sequence(z.split(sizes), batch_first=True)
    longest = padded.shape[1]
    counts = torch.tensor(sizes)
    sample = torch.repeat_interleave(torch.arange(len(sizes)), counts * counts)
    starts = torch.cumsum(counts * counts, 0) - counts * counts
    within = torch.arange(len(gram)) - starts[sample]
    g = torch.zeros((len(sizes), longest, longest))
    g[sample, within // counts[sample], within % counts[sample]] = gram.float()
    squared = (torch.bmm(padded, padded.transpose(1, 2)) * g).sum((1, 2)).double()
    return squared.clamp_min(0).sqrt()


def target_of(states: list[LabelStates], math: LabelMath, sketch: torch.Tensor, pre: Preconditioner | None,
              normalize: str, columns: str) -> Target:
    """The target of validation samples' label states: one group, their mean (``columns="mean"``:
    select's ``Gbar``), or a group per sample (``"each"``: pairwise values)."""
    encoded = encode(states, math, sketch)  # the target's own gram gives its exact norms
    sizes = encoded.sizes
    whitened = encoded.hidden.float() if pre is None else pre.whiten(encoded.hidden.float())
    norms = sample_norms(whitened.cpu(), encoded.gram.cpu(), sizes, normalize)
    errors = encoded.errors
    owner = torch.repeat_interleave(torch.arange(len(states)), torch.tensor(sizes))
    per_token = (1.0 / norms)[owner]
    if columns == "mean":
        weights = (per_token / len(states))[:, None]
    else:
        weights = torch.zeros((len(owner), len(states)), dtype=torch.float64)
        weights[torch.arange(len(owner)), owner] = per_token
    projected = encoded.hidden.float() if pre is None else pre.apply(encoded.hidden.double()).float()
    return Target(projected.cpu(), errors.float().cpu(), weights.float(), pre, normalize)


def moments_of(states: list[LabelStates]) -> tuple[torch.Tensor, int]:
    """``sum h h^T`` and the token count of label states (a target's own ``P``)."""
    moments = MomentAccumulator(states[0].hidden.shape[1], states[0].hidden.device)
    for s in states:
        moments.add(s.hidden)
    return moments.moment_sum, moments.tokens
