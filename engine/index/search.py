"""The index's fast routes: the coarse vectors rank, the stored tokens value what they keep
(docs/design.md, "Index").

- A **query** (one sample's most and least valuable stored samples) keeps ``max(CANDIDATES,
  4 top)`` samples per side by the coarse estimate (from the lists' probed members on a large
  pool) and values those exactly, with the pool's ``P`` as it is now.
- **select** with a shortlist (``Index.select(..., shortlist=m)``) values exactly, with the
  target's ``P`` and norms, the ``m x budget`` samples of highest estimate (shared among the
  validation samples, for round-robin) and chooses among those; ``m = 0`` selects on the
  estimates alone, whose divisors are under the vectors' frozen ``P``, not the target's
  (what each route keeps of the exact choice: bench/results/index.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..valuation.precondition import Preconditioner
from . import coarse, lists
from .layout import Target

if TYPE_CHECKING:
    from .index import Index


@dataclass
class _Held:
    key: str  # the state of the index and the options they hold for
    vectors: coarse.CoarseVectors
    frozen: Preconditioner | None  # the P they were whitened with
    divisors_exact: bool  # their divisors are a query's (the pool's P is still the frozen one)


class CoarseSearch:
    """The coarse vectors of one index, held while the index and the options stay the same."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._held: _Held | None = None

    def query(self, target: Target, top: int) -> tuple[list[str], np.ndarray]:
        """Ids and exact values of the candidates of a query ``target`` (one group per sample)."""
        vectors, frozen = self.vectors(), self.whitening()
        queries = self.sketch().target_vectors(target, frozen)
        chosen = vectors.candidates(queries, max(coarse.CANDIDATES, 4 * top))
        # The vectors' divisors are exact under the frozen P: the query's while the pool is
        # unchanged since (no whitening of the candidates: most of a query's time otherwise).
        norms = vectors.norms[chosen] if self._held.divisors_exact else None
        return self.ids(chosen), self._valued(target, vectors, chosen, norms)

    def values(self, target: Target, share: float) -> tuple[np.ndarray, np.ndarray]:
        """Every live stored sample's value against each group of ``target`` (index order) and
        whether it is a coarse estimate: each group's ``share`` of the pool of highest estimate
        is valued exactly (with the target's ``P`` and norms), the rest estimated."""
        vectors, frozen = self.vectors(), self.whitening()
        values = vectors.estimates(self.sketch().target_vectors(target, frozen))
        estimated = np.ones(len(values), dtype=bool)
        if share > 0:
            per_group = min(len(values), math.ceil(share * len(values)))
            kept = values.topk(per_group, dim=0).indices.reshape(-1).unique()
            values[kept] = torch.from_numpy(self._valued(target, vectors, kept, None))
            estimated[kept.numpy()] = False
        return values.numpy(), estimated

    def vectors(self) -> coarse.CoarseVectors:
        """The live samples' coarse vectors (index order) for this state of the index and the
        options: held, else assembled from the saved shards' (built where missing)."""
        index, config = self.index, self.index.config
        pool = index.pool_preconditioner()
        key = json.dumps({"index": index.fingerprint, "normalize": config.normalize,
                          "damping": repr(None if pool is None else pool.damping)})
        if self._held is None or self._held.key != key:
            store = coarse.CoarseStore(index.folder, self.sketch(), self._seed())
            frozen = store.whitening(pool)
            frozen_id = coarse.whitening_id(frozen)
            found = self._assemble(store, frozen, frozen_id)
            if len(found.vectors) >= lists.LISTS_FROM:
                found.lists = store.lists(found, {"index": index.fingerprint, "normalize": config.normalize,
                                                  "whitening": frozen_id, "size": coarse.COARSE_SIZE})
            exact = config.normalize != "cosine" or _same(pool, frozen)
            self._held = _Held(key, found, frozen, divisors_exact=exact)
        return self._held.vectors

    def whitening(self) -> Preconditioner | None:
        """The frozen ``P`` the held vectors were built with (engine/index/coarse.py)."""
        self.vectors()
        return self._held.frozen

    def sketch(self) -> coarse.CoarseSketch:
        identity = self.index.manifest["identity"]
        return coarse.CoarseSketch(identity["sketch"]["rows"], int(identity["hidden_size"]), self._seed())

    def ids(self, positions: np.ndarray | torch.Tensor) -> list[str]:
        """The ids of the stored samples at ``positions`` of the coarse vectors."""
        places = self.vectors().places[torch.as_tensor(positions, dtype=torch.int64)]
        return [self.index.shard(number).ids[p] for number, p in places.tolist()]

    def _seed(self) -> int:
        return int(self.index.manifest["identity"]["sketch"]["seed"])

    def _assemble(self, store: coarse.CoarseStore, frozen: Preconditioner | None,
                  frozen_id: str) -> coarse.CoarseVectors:
        """Each shard's saved vectors (built where missing), the deleted samples left out."""
        index = self.index
        parts, norms, places, files = [], [], [], set()
        count = sum(1 for entry in index.manifest["shards"] if entry["file"])
        shards = tqdm(index.live_shards(), total=count, desc="coarse vectors", unit="shard",
                      disable=not index.progress or count < 2)
        for number, shard, positions in shards:
            entry = index.manifest["shards"][number]
            vectors, cosine = store.shard_vectors(entry, shard, frozen, frozen_id)
            live = torch.tensor(positions, dtype=torch.int64)
            parts.append(vectors if len(live) == len(vectors) else vectors[live])
            norms.append(coarse.divisors(cosine, shard.counts, index.config.normalize)[live])
            places.append(torch.stack([torch.full_like(live, number), live], dim=1))
            files.add(entry["file"])
        store.forget_others(files)
        if not parts:
            raise ValueError(f"{index.folder} holds no sample")
        return coarse.CoarseVectors(torch.cat(parts), torch.cat(norms), torch.cat(places))

    def _valued(self, target: Target, vectors: coarse.CoarseVectors, positions: torch.Tensor,
                norms: torch.Tensor | None) -> np.ndarray:
        """Exact values of the stored samples at ``positions`` (ascending: the vectors are in
        index order, so reading shard by shard keeps their order), with the target's ``P``,
        divided by ``norms`` (else by norms computed under the target's ``P``)."""
        chunks = [self.index.shard(number).gather(places)
                  for number, places in vectors.by_shard(positions).items()]
        stored = [torch.cat([getattr(c, part) for c in chunks]) for part in ("hidden", "errors", "gram")]
        return target.values(*stored, [n for c in chunks for n in c.sizes], norms,
                             [n for c in chunks for n in c.counts]).numpy()


def _same(pool: Preconditioner | None, frozen: Preconditioner | None) -> bool:
    """Whether the pool's ``P`` now is the frozen one (no change to the pool since)."""
    return pool is None or (pool.tokens == frozen.tokens and torch.equal(pool.moment_sum, frozen.moment_sum))
