"""The preconditioned value (docs/design.md, "Preconditioned value").

    A    = (1/N) sum_t h_t h_t^T      over the label-predicting hidden states of a covariance set
    M    = A + lambda I,  lambda = damping * tr(A) / d
    v_P(a, b) = <G(a) M^-1, G(b)>

With the Cholesky factor ``M = C C^T``, ``M^-1 = C^-T C^-1`` and

    v_P(a, b) = <G'(a), G'(b)>,   G'(x) = sum_t e_t h'_t^T,   h'_t = C^-1 h_t,

where ``e_t`` is unchanged because ``W h_t = (W C) h'_t``. So every exact route of the plain
value (token gram, ``error_outer``, ``reference_score``) computes the preconditioned one on
whitened states ``h'`` and, where a kernel derives ``e_t`` from the states it contracts with,
the whitened head ``W' = W C`` (built once, ``V d^2``). A ``V x d`` matrix is never multiplied
by ``M^-1`` per sample: the reference side does it once, when the reference is loaded.

Everything is accumulated and factored in float64; results are cast to the model's dtype.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import replace_atomically
from ..version import __version__

COVARIANCE_FORMAT = "forvalue.covariance/1"
# Defaults of ``damping`` by where A comes from: the validation set (a whitening of few, similar
# states, which needs little damping), or a training pool (an influence approximation over a
# broad set, where the small eigenvalues are noise).
DAMPING_VALID = 0.01
DAMPING_POOL = 0.1
# Rows of a V x d matrix multiplied at a time, so that a float64 copy of it never exists.
_ROW_CHUNK = 16384


def resolve_damping(precondition: str | None, damping: float | None, from_pool: bool) -> float | None:
    """The damping in force: the one asked for, else the default of where ``A`` comes from
    (None without a preconditioner)."""
    if precondition is None or damping is not None:
        return damping
    return DAMPING_POOL if from_pool else DAMPING_VALID


class CovarianceMismatch(ValueError):
    """A covariance used with a model or labelling it was not built with."""


@dataclass
class Covariance:
    """``moment_sum = sum_t h_t h_t^T`` (float64) over ``tokens`` label-predicting states.

    ``identity`` is the model's identity (what must match); ``source`` says what it was built
    from: ``loss_on`` and a fingerprint of the token ids and label masks, in order.
    """

    moment_sum: torch.Tensor
    tokens: int
    identity: dict[str, str]
    source: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError("a covariance needs at least one label token (the set has none)")
        self.moment_sum = self.moment_sum.to(torch.float64)

    @property
    def fingerprint(self) -> str:
        return self.source.get("fingerprint", "")

    def check_compatible(self, identity: dict[str, str], loss_on: str) -> None:
        diffs = [f"{key}: covariance has {self.identity.get(key)!r}, the model has {value!r}"
                 for key, value in identity.items()
                 if key != "model_name" and self.identity.get(key) != value]
        if self.source.get("loss_on", loss_on) != loss_on:
            diffs.append(f"loss_on: covariance has {self.source['loss_on']!r}, valuation uses {loss_on!r}")
        if self.identity.get("skip_depth") != identity.get("skip_depth"):
            diffs.append("build it with the same skip_depth (--skip-depth), or value with that of the "
                         "covariance (--skip-depth none for none)")
        if diffs:
            raise CovarianceMismatch("this covariance was built differently and cannot be used: "
                                     + "; ".join(diffs))

    def merge(self, other: Covariance) -> Covariance:
        """The covariance of both sets (their fingerprints combined in this order)."""
        other.check_compatible(self.identity, self.source.get("loss_on", ""))
        fingerprint = _digest(self.fingerprint.encode() + other.fingerprint.encode())
        return Covariance(self.moment_sum + other.moment_sum.to(self.moment_sum), self.tokens + other.tokens,
                          dict(self.identity), {**self.source, "fingerprint": fingerprint})

    @property
    def effective_rank(self) -> int:
        return effective_rank(self.moment_sum)

    def preconditioner(self, damping: float) -> Preconditioner:
        return Preconditioner(self.moment_sum, self.tokens, damping)

    def save(self, path: str | os.PathLike) -> None:
        metadata = {"format": COVARIANCE_FORMAT, "tokens": str(self.tokens),
                    "identity": json.dumps(self.identity), "source": json.dumps(self.source)}
        tensors = {"moment_sum": self.moment_sum.detach().cpu().contiguous()}
        replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Covariance:
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != COVARIANCE_FORMAT:
                    raise CovarianceMismatch(f"{path} is not a forvalue covariance file")
                moment_sum = f.get_tensor("moment_sum")
            identity = json.loads(metadata["identity"])
            source = json.loads(metadata.get("source", "{}"))
            tokens = int(metadata["tokens"])
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            if isinstance(exc, CovarianceMismatch):
                raise
            raise CovarianceMismatch(f"cannot read covariance {path}: {exc}") from None
        if identity.get("forvalue_version") != __version__:
            raise CovarianceMismatch(f"{path} was built by forvalue {identity.get('forvalue_version')}, "
                                     f"this is {__version__}; rebuild it")
        return cls(moment_sum, tokens, identity, source)


class MomentAccumulator:
    """Streams ``sum h h^T`` (float64) and a fingerprint of what it saw."""

    def __init__(self, hidden_size: int, device: torch.device) -> None:
        self.moment_sum = torch.zeros((hidden_size, hidden_size), dtype=torch.float64, device=device)
        self.tokens = 0
        self._digest = hashlib.sha256()

    def add(self, hidden: torch.Tensor, input_ids: Iterable[int] = (),
            label_mask: Iterable[bool] = ()) -> None:
        h = hidden.to(torch.float64)
        self.moment_sum += h.T @ h
        self.tokens += h.shape[0]
        self._digest.update(json.dumps([list(input_ids), [int(m) for m in label_mask]]).encode())

    def covariance(self, identity: dict[str, str], loss_on: str) -> Covariance:
        source = {"loss_on": loss_on, "fingerprint": self._digest.hexdigest()[:32]}
        return Covariance(self.moment_sum.cpu(), self.tokens, dict(identity), source)


class Preconditioner:
    """``M = A + lambda I`` factored once; whitens states, heads and gradients."""

    def __init__(self, moment_sum: torch.Tensor, tokens: int, damping: float) -> None:
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if tokens <= 0:
            raise ValueError("the covariance set has no label token")
        A = moment_sum.to(torch.float64) / tokens
        d = A.shape[0]
        self.damping = float(damping)
        self.lam = self.damping * float(torch.trace(A)) / d
        if not self.lam > 0:
            raise ValueError("the covariance is zero (all hidden states vanish): nothing to precondition")
        self.moment_sum, self.tokens = moment_sum, tokens  # what it was factored from
        M = A + self.lam * torch.eye(d, dtype=torch.float64, device=A.device)
        self.factor = torch.linalg.cholesky(M)  # lower C, M = C C^T
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None  # (W, W C), built on first use

    @functools.cached_property
    def effective_rank(self) -> int:
        """``A``'s numerical rank, reported with a reference (an eigendecomposition: computed
        when asked for, not by every query that only whitens)."""
        return effective_rank(self.moment_sum)

    def whiten(self, hidden: torch.Tensor) -> torch.Tensor:
        """``h' = C^-1 h`` per row, in ``hidden``'s dtype (computed in float64)."""
        C = self.factor.to(hidden.device)
        solved = torch.linalg.solve_triangular(C, hidden.to(torch.float64).T, upper=False)
        return solved.T.to(hidden.dtype)

    def whiten_head(self, weight: torch.Tensor) -> torch.Tensor:
        """``W' = W C``, so that ``W' h' = W h`` (``V d^2`` once; kept for the same ``W``)."""
        if self._head is None or self._head[0] is not weight:
            self._head = (weight, self.dual(weight))
        return self._head[1]

    def dual(self, rows: torch.Tensor) -> torch.Tensor:
        """``C^T x`` per row ``x``: the row whose inner product with whitened states equals
        ``x``'s with the states themselves (``(C^T x) . (C^-1 h) = x . h``)."""
        return self._rows(rows, lambda rows, C: rows @ C)

    def apply(self, gradient: torch.Tensor) -> torch.Tensor:
        """``G M^-1`` (a reference's mean gradient, once per load)."""
        return self._rows(gradient, lambda rows, C: torch.cholesky_solve(rows.T, C).T)

    def _rows(self, matrix: torch.Tensor, op: object) -> torch.Tensor:
        C = self.factor.to(matrix.device)
        out = torch.empty_like(matrix)
        for start in range(0, matrix.shape[0], _ROW_CHUNK):
            rows = matrix[start:start + _ROW_CHUNK].to(torch.float64)
            out[start:start + _ROW_CHUNK] = op(rows, C).to(matrix.dtype)
        return out


def effective_rank(moment_sum: torch.Tensor) -> int:
    """The numerical rank of ``A`` (a validation set with fewer label tokens than ``d`` has
    rank below ``d``: normal, the damping handles it)."""
    return int(torch.linalg.matrix_rank(moment_sum.to(torch.float64), hermitian=True, rtol=1e-10))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]
