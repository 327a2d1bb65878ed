"""Coarse vectors: a query's shortlist in one matrix product (docs/design.md, "Index").

A query (one sample's most and least valuable stored samples) whitens with the pool's ``P``,
known once the pool is stored. So each stored sample also gets a small vector, a sketch of its
whitened gradient on both sides: ``x(a) = sum_t (Q^T u_t) (S^T z_t)^T`` (``Q``: ``k x 32``,
``S``: ``D x 64``, Gaussian; ``u_t`` the stored error sketch, ``z_t = C^-1 h_t``), 2048 values,
with ``<x(a), x(b)>`` an unbiased estimate of ``<G(a) P, G(b)>``. A query scores every stored
sample by ``<x(a), x(q)> / norm(a)`` (norms exact, from the stored gram), keeps the best and the
worst ``SHORTLIST`` per side, and values those exactly from the stored tokens. The vectors are
built on the first query after the index changed and kept beside the shards in
``coarse.safetensors``, with the fingerprint of the index and the options they were built for.
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
from .layout import Target, sample_norms
from .store import ShardChunk

COARSE_ERRORS, COARSE_STATES = 32, 64  # the two sides of a coarse vector: 2048 values
SHORTLIST = 512  # stored samples per side of a query valued exactly, at least (8 top, if more)
COARSE_FILE = "coarse.safetensors"


class CoarseSketch:
    """``Q`` and ``S`` from the index's sketch seed (another stream than ``R``'s)."""

    def __init__(self, error_rows: int, features: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed + 1)
        self.errors = torch.randn(error_rows, COARSE_ERRORS, generator=generator) / COARSE_ERRORS ** 0.5
        self.states = torch.randn(features, COARSE_STATES, generator=generator) / COARSE_STATES ** 0.5

    def token_vectors(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``(Q^T u_t) (S^T z_t)^T`` per token, flattened: ``(tokens, 2048)``."""
        left, right = u.float() @ self.errors, z.float() @ self.states
        return (left[:, :, None] * right[:, None, :]).reshape(len(z), -1)

    def vectors(self, z: torch.Tensor, u: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        out = torch.zeros((len(sizes), COARSE_ERRORS * COARSE_STATES))
        return out.index_add_(0, owner, self.token_vectors(z, u))

    def target_vectors(self, target: Target) -> torch.Tensor:
        """``sum_s w_sg x_s`` per group of ``target``: ``(groups, 2048)``."""
        return target.weights.T @ self.token_vectors(target.whitened, target.errors)


@dataclass
class CoarseVectors:
    """Every live stored sample's coarse vector and exact norm, with where it is stored."""

    vectors: torch.Tensor  # (n, 2048) bfloat16
    norms: torch.Tensor  # (n,) float64
    places: torch.Tensor  # (n, 2) int64: (shard entry number, position in the shard)

    def shortlist(self, queries: torch.Tensor, top: int) -> dict[int, tuple[list[int], torch.Tensor]]:
        """The ``max(SHORTLIST, 8 top)`` best and worst samples of each query: per shard entry
        number, their positions in the shard and their norms."""
        scores = (self.vectors.float() @ queries.T).double() / self.norms[:, None]
        count = min(len(scores), max(SHORTLIST, 8 * top))
        chosen = torch.cat([scores.topk(count, dim=0).indices.reshape(-1),
                            (-scores).topk(count, dim=0).indices.reshape(-1)]).unique()
        by_shard: dict[int, tuple[list[int], torch.Tensor]] = {}
        for number in self.places[chosen, 0].unique().tolist():
            mine = chosen[self.places[chosen, 0] == number]
            by_shard[number] = (self.places[mine, 1].tolist(), self.norms[mine])
        return by_shard


def build(chunks: Iterator[tuple[int, ShardChunk, list[int]]], sketch: CoarseSketch,
          pre: Preconditioner | None, normalize: str) -> CoarseVectors:
    """The coarse vectors of ``chunks`` (shard entry number, chunk, its live rows)."""
    vectors, norms, places = [], [], []
    for number, chunk, live in chunks:
        z = chunk.hidden.float() if pre is None else pre.whiten(chunk.hidden.float())
        vectors.append(sketch.vectors(z, chunk.errors, chunk.sizes)[live].to(torch.bfloat16))
        norms.append(sample_norms(z, chunk.gram, chunk.sizes, normalize)[live])
        places.append(torch.tensor([[number, chunk.positions[j]] for j in live], dtype=torch.int64))
    if not vectors:
        raise ValueError("the index holds no sample")
    return CoarseVectors(torch.cat(vectors), torch.cat(norms), torch.cat(places))


def save(folder: Path, coarse: CoarseVectors, stamp: dict[str, str]) -> None:
    tensors = {"vectors": coarse.vectors, "norms": coarse.norms, "places": coarse.places}
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
            return CoarseVectors(f.get_tensor("vectors"), f.get_tensor("norms"), f.get_tensor("places"))
    except (OSError, SafetensorError, ValueError):
        return None  # unreadable: built again
