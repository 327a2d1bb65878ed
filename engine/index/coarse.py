"""Coarse vectors: every stored sample ranked for a target in one pass (docs/design.md, "Index").

Each stored sample also gets a small vector, a sketch of its gradient whitened with the pool's
``P``: ``x(a) = sum_t TS(u_t, z_t)`` (``TS``: the tensor sketch of ``u_t (x) z_t`` below; ``u_t``
the stored error sketch, ``z_t = C^-1 h_t``), ``COARSE_SIZE`` values. A
target's vector is built the same way from ``y_s = C^T P' h_s`` (``P'`` the target's own, so
``y_s . z_t = h_s^T P' h_t``), and ``<x(a), x(target)>`` is an unbiased estimate of the target's
value ``<G(a) P', G(target)>`` whatever ``P'``. The divisors kept beside the vectors are exact
under the pool's ``P``: a query's (one sample has no ``P`` of its own), not select's. The vectors
are built on the first use after the index changed and kept beside the shards in
``coarse.safetensors``, with the fingerprint of the index and the options they were built for;
from ``LISTS_FROM`` samples on, with inverted lists (engine/index/lists.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import replace_atomically
from ..valuation.precondition import Preconditioner
from . import lists as inverted
from .layout import Target, sample_norms
from .store import ShardChunk

COARSE_SIZE = 4096  # values per coarse vector: 8 KiB in bfloat16; 1M of them read in 0.7 s
CANDIDATES = 64  # stored samples per side of a query valued exactly, at least (4 top, if more)
COARSE_FILE = "coarse.safetensors"


class CoarseSketch:
    """A tensor sketch (Pham and Pagh, 2013) of ``u_t (x) z_t``: count sketches of both sides
    (``COARSE_SIZE`` buckets, random signs, from the index's sketch seed: another stream than
    ``R``'s), circularly convolved. ``<x(a), x(b)>`` estimates ``sum (u_t . u_s)(z_t . z_s)``
    without bias, with a variance of about ``3 / COARSE_SIZE`` of the squared norms: a fifth of
    the noise of a Gaussian sketch of each side to 32 and 64 values at the same size
    (bench/results/index.md)."""

    def __init__(self, error_rows: int, features: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed + 1)
        self.error_buckets = torch.randint(COARSE_SIZE, (error_rows,), generator=generator)
        self.error_signs = torch.randint(2, (error_rows,), generator=generator) * 2.0 - 1
        self.state_buckets = torch.randint(COARSE_SIZE, (features,), generator=generator)
        self.state_signs = torch.randint(2, (features,), generator=generator) * 2.0 - 1

    def token_vectors(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The sketch of ``u_t (x) z_t`` per token: ``(tokens, COARSE_SIZE)``."""
        left = _count_sketch(u.float() * self.error_signs, self.error_buckets)
        right = _count_sketch(z.float() * self.state_signs, self.state_buckets)
        return torch.fft.irfft(torch.fft.rfft(left) * torch.fft.rfft(right), n=COARSE_SIZE)

    def vectors(self, z: torch.Tensor, u: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        out = torch.zeros((len(sizes), COARSE_SIZE))
        return out.index_add_(0, owner, self.token_vectors(z, u))

    def target_vectors(self, target: Target, pool: Preconditioner | None) -> torch.Tensor:
        """``sum_s w_sg x_s`` per group of ``target`` (``x_s`` from ``y_s = C^T P' h_s``, ``C``
        the pool's factor the stored vectors were whitened with): ``(groups, COARSE_SIZE)``."""
        moved = target.projected if pool is None else pool.dual(target.projected.double()).float()
        return target.weights.T @ self.token_vectors(moved, target.errors)


def _count_sketch(signed: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(signed), COARSE_SIZE).index_add_(1, buckets, signed)


@dataclass
class CoarseVectors:
    """Every live stored sample's coarse vector and exact norm under the pool's ``P``, with
    where it is stored (in index order)."""

    vectors: torch.Tensor  # (n, COARSE_SIZE) bfloat16
    norms: torch.Tensor  # (n,) float64
    places: torch.Tensor  # (n, 2) int64: (shard entry number, position in the shard)
    lists: inverted.Lists | None = None

    def estimates(self, queries: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``<x(a), q> / norm(a)`` for each stored sample ``a`` (or those at ``rows``) and each
        row ``q`` of ``queries``: ``(samples, queries)`` float64. One matrix-vector product per
        query: in bfloat16 it reads 1M vectors in 0.3 s on two cores, where a matrix product
        of bfloat16 takes 20 times longer."""
        x = self.vectors if rows is None else self.vectors[rows]
        norms = self.norms if rows is None else self.norms[rows]
        columns = [torch.mv(x, q.to(x.dtype)).double() for q in queries]
        return torch.stack(columns, dim=1) / norms[:, None]

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """Positions of the ``count`` samples of highest and of lowest estimate per query
        (from the lists' probed members where the vectors have lists)."""
        chosen = []
        for side in (1, -1):
            probed = self.lists.probed(queries, side) if self.lists is not None else [None] * len(queries)
            for query, rows in zip(queries, probed, strict=True):
                found = side * self.estimates(query[None], rows)[:, 0]
                best = found.topk(min(count, len(found))).indices
                chosen.append(best if rows is None else rows[best])
        return torch.cat(chosen).unique()

    def by_shard(self, positions: torch.Tensor) -> dict[int, list[int]]:
        """``positions`` grouped by shard entry number: each one's positions in its shard."""
        numbers = self.places[positions, 0]
        return {number: self.places[positions[numbers == number], 1].tolist()
                for number in numbers.unique().tolist()}


def build(chunks: Iterator[tuple[int, ShardChunk, list[int]]], sketch: CoarseSketch,
          pre: Preconditioner | None, normalize: str, seed: int) -> CoarseVectors:
    """The coarse vectors of ``chunks`` (shard entry number, chunk, its live rows), with lists
    (drawn from ``seed``) when they are many."""
    vectors, norms, places = [], [], []
    for number, chunk, live in chunks:
        z = chunk.hidden.float() if pre is None else pre.whiten(chunk.hidden.float())
        vectors.append(sketch.vectors(z, chunk.errors, chunk.sizes)[live].to(torch.bfloat16))
        norms.append(sample_norms(z, chunk.gram, chunk.sizes, normalize)[live])
        places.append(torch.tensor([[number, chunk.positions[j]] for j in live], dtype=torch.int64))
    if not vectors:
        raise ValueError("the index holds no sample")
    found = CoarseVectors(torch.cat(vectors), torch.cat(norms), torch.cat(places))
    if len(found.vectors) >= inverted.LISTS_FROM:
        found.lists = inverted.build(found.vectors, found.norms, seed)
    return found


def save(folder: Path, coarse: CoarseVectors, stamp: dict[str, str]) -> None:
    tensors = {"vectors": coarse.vectors, "norms": coarse.norms, "places": coarse.places,
               **(coarse.lists.tensors() if coarse.lists is not None else {})}
    metadata = {"stamp": json.dumps(stamp)}
    replace_atomically(folder / COARSE_FILE, lambda tmp: save_file(tensors, tmp, metadata))


def load(folder: Path, stamp: dict[str, str]) -> CoarseVectors | None:
    """The saved vectors when they were built for ``stamp`` (this index and options), else None."""
    path = folder / COARSE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("stamp", "null")) != stamp:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return CoarseVectors(tensors["vectors"], tensors["norms"], tensors["places"],
                             inverted.Lists.from_tensors(tensors))
    except (OSError, SafetensorError, ValueError, KeyError):
        return None  # unreadable: built again
