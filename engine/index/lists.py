"""Inverted lists over the coarse vectors: a query reads a few lists, not the whole pool
(docs/design.md, "Index").

Reading every coarse vector (4096 values per stored sample) costs a query about 0.5 s at 1M
stored samples on two cores, so from ``LISTS_FROM`` samples on the vectors, divided by their
norms (what a query ranks by), are grouped into ``sqrt(n)`` lists by spherical k-means on a
``PROJECTED``-value random projection of them. A query scores the lists' centroids and reads
the ``probes`` lists of highest score for its most valuable samples and of lowest score for its
least valuable; their members are first ranked by their projections (``PROJECTED`` values,
kept in bfloat16: 512 MB at 1M), and the ``PREFILTER`` best by the full coarse estimate. A
sample's value against a query is signed, so both ends of the centroid ranking are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below, a query reads every coarse vector: on noisy coarse vectors the lists lose recall (0.63
# at recall@10 with 1/32 of the lists probed, 0.81 with 1/4, against 0.985 for a full read:
# bench/results/index.md), so they serve only pools where a full read takes seconds.
LISTS_FROM = 4_000_000
PROJECTED = 256  # values per vector the lists are clustered on
TRAIN_PER_LIST = 64  # k-means learns from this many sampled vectors per list
ITERATIONS = 8
PROBE_SHARE = 1 / 32  # lists read per side of a query: recall in bench/results/index.md
PREFILTER = 2048  # probed members per side ranked by their full coarse vectors
BLOCK = 65536  # vectors converted to float32 at a time


@dataclass
class Lists:
    """Which list each stored sample is in: ``members[starts[j]:starts[j + 1]]`` are list
    ``j``'s positions in the coarse vectors."""

    projection: torch.Tensor  # (coarse values, PROJECTED) float32
    projected: torch.Tensor  # (n, PROJECTED) bfloat16: each vector / norm, projected
    centroids: torch.Tensor  # (lists, PROJECTED) float32, unit rows
    members: torch.Tensor  # (n,) int64
    starts: torch.Tensor  # (lists + 1,) int64

    NAMES = ("lists_projection", "lists_projected", "lists_centroids", "lists_members", "lists_starts")

    @property
    def count(self) -> int:
        return len(self.centroids)

    def probed(self, queries: torch.Tensor, side: int) -> list[torch.Tensor]:
        """Per query (rows of ``queries``), the ``PREFILTER`` positions of highest projected
        score in the lists it reads on ``side`` (+1: its most valuable samples, -1: its least)."""
        probes = max(1, round(self.count * PROBE_SHARE))
        queries = side * (queries.float() @ self.projection)
        chosen = (queries @ self.centroids.T).topk(min(probes, self.count), dim=1).indices
        found = []
        for query, lists in zip(queries, chosen, strict=True):
            rows = torch.cat([self.members[self.starts[j]:self.starts[j + 1]] for j in lists.tolist()])
            scores = torch.mv(self.projected[rows], query.to(self.projected.dtype))
            found.append(rows[scores.topk(min(PREFILTER, len(rows))).indices])
        return found

    def tensors(self) -> dict[str, torch.Tensor]:
        parts = (self.projection, self.projected, self.centroids, self.members, self.starts)
        return dict(zip(self.NAMES, parts, strict=True))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Lists | None:
        """The lists saved as ``tensors``, or None where any part is missing."""
        if any(name not in tensors for name in cls.NAMES):
            return None
        return cls(*(tensors[name] for name in cls.NAMES))


def build(vectors: torch.Tensor, norms: torch.Tensor, seed: int) -> Lists:
    """The lists of ``vectors / norms`` (``(n, coarse values)``, any float dtype)."""
    generator = torch.Generator().manual_seed(seed + 2)  # another stream than the sketches'
    projection = torch.randn(vectors.shape[1], PROJECTED, generator=generator) / PROJECTED ** 0.5
    blocks = range(0, len(vectors), BLOCK)
    projected = torch.cat([(vectors[i:i + BLOCK].float() / norms[i:i + BLOCK, None].float() @ projection)
                           .to(torch.bfloat16) for i in blocks])
    count = max(1, round(len(vectors) ** 0.5))
    sample = torch.randperm(len(vectors), generator=generator)[:count * TRAIN_PER_LIST]
    centroids = _kmeans(_unit(projected[sample].float()), count, generator)
    owner = torch.cat([(projected[i:i + BLOCK].float() @ centroids.T).argmax(1) for i in blocks])
    members = torch.argsort(owner, stable=True)
    starts = torch.zeros(count + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(torch.bincount(owner, minlength=count), 0)
    return Lists(projection, projected, centroids, members, starts)


def _kmeans(points: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Spherical k-means: unit centroids, points assigned by inner product; an emptied list
    restarts at a random point."""
    centroids = points[torch.randperm(len(points), generator=generator)[:count]].clone()
    for _ in range(ITERATIONS):
        owner = (points @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, owner, points)
        empty = torch.bincount(owner, minlength=count) == 0
        restart = torch.randint(len(points), (int(empty.sum()),), generator=generator)
        sums[empty] = points[restart]
        centroids = _unit(sums)
    return centroids


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
