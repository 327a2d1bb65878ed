"""The index's fast routes: the coarse vectors rank, the stored tokens value what they keep
(docs/design.md, "Index").

- A **query** (one sample's most and least valuable stored samples) keeps ``max(CANDIDATES,
  4 top)`` samples per side by the coarse estimate and values those exactly, dividing by the
  coarse vectors' exact norms (a query's ``P`` is the pool's, as theirs).
- **select** with a shortlist (``Index.select(..., shortlist=m)``) values exactly, with the
  target's ``P`` and norms, the ``m x budget`` samples of highest estimate (shared among the
  validation samples, for round-robin) and chooses among those; ``m = 0`` selects on the
  estimates alone, whose cosine divisors are the pool's, not the target's (the difference is
  measured in bench/results/index.md).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import coarse
from .layout import Target

if TYPE_CHECKING:
    from ..inputs.samples import SampleError
    from .index import Index


class CoarseSearch:
    """The coarse vectors of one index, held while the index and the options stay the same."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._held: tuple[str, coarse.CoarseVectors] | None = None

    def query(self, target: Target, top: int) -> tuple[list[str], np.ndarray]:
        """Ids and exact values of the candidates of a query ``target`` (one group per sample)."""
        vectors = self.vectors()
        queries = self.sketch().target_vectors(target, self.index.pool_preconditioner())
        chosen = vectors.candidates(queries, max(coarse.CANDIDATES, 4 * top))
        return self._ids(vectors, chosen), self._valued(target, vectors, chosen, pool_norms=True)

    def values(self, target: Target, share: float) -> tuple[np.ndarray, np.ndarray]:
        """Every live stored sample's value against each group of ``target`` (index order) and
        whether it is a coarse estimate: each group's ``share`` of the pool of highest estimate
        is valued exactly (with the target's ``P`` and norms), the rest estimated."""
        vectors = self.vectors()
        values = vectors.estimates(self.sketch().target_vectors(target, self.index.pool_preconditioner()))
        estimated = np.ones(len(values), dtype=bool)
        if share > 0:
            per_group = min(len(values), math.ceil(share * len(values)))
            kept = values.topk(per_group, dim=0).indices.reshape(-1).unique()
            values[kept] = torch.from_numpy(self._valued(target, vectors, kept, pool_norms=False))
            estimated[kept.numpy()] = False
        return values.numpy(), estimated

    def vectors(self) -> coarse.CoarseVectors:
        """The coarse vectors for this index and the options: held, saved, else built."""
        pre, index = self.index.pool_preconditioner(), self.index
        stamp = {"index": index.fingerprint, "normalize": index.config.normalize,
                 "damping": "none" if pre is None else repr(pre.damping)}
        key = json.dumps(stamp, sort_keys=True)
        if self._held is None or self._held[0] != key:
            found = coarse.load(index.folder, stamp)
            if found is None:
                found = coarse.build(index.live_chunks(), self.sketch(), pre, index.config.normalize,
                                     index.manifest["identity"]["sketch"]["seed"])
                coarse.save(index.folder, found, stamp)
            self._held = (key, found)
        return self._held[1]

    def sketch(self) -> coarse.CoarseSketch:
        identity = self.index.manifest["identity"]
        return coarse.CoarseSketch(identity["sketch"]["rows"], int(identity["hidden_size"]),
                                   identity["sketch"]["seed"])

    def _ids(self, vectors: coarse.CoarseVectors, positions: torch.Tensor) -> list[str]:
        return [self.index.shard(number).ids[p] for number, p in vectors.places[positions].tolist()]

    def _valued(self, target: Target, vectors: coarse.CoarseVectors, positions: torch.Tensor,
                pool_norms: bool) -> np.ndarray:
        """Exact values of the stored samples at ``positions`` (ascending: the vectors are in
        index order, so reading shard by shard keeps their order), divided by the vectors'
        norms (the pool's ``P``) or by norms computed under the target's ``P``."""
        chunks = [self.index.shard(number).gather(places)
                  for number, places in vectors.by_shard(positions).items()]
        stored = [torch.cat([getattr(c, part) for c in chunks]) for part in ("hidden", "errors", "gram")]
        sizes = [n for c in chunks for n in c.sizes]
        return target.values(*stored, sizes, vectors.norms[positions] if pool_norms else None).numpy()


def ranked_answers(ids: list[str], values: np.ndarray, samples: int, errors: list[SampleError],
                   top: int) -> list[dict[str, Any]]:
    """A query's answer per sample (in order): its ``top`` most and least valuable of the
    valued stored samples (``values``: one column per sample without an error), or its error."""
    failed = {e.index for e in errors}
    usable = [i for i in range(samples) if i not in failed]
    answers = []
    for column, position in enumerate(usable):
        order = np.argsort(-values[:, column], kind="stable")
        ranked = [{"id": ids[i], "value": float(values[i, column])} for i in order]
        answers.append({"position": position, "most": ranked[:top], "least": ranked[::-1][:top]})
    answers.extend({"position": error.index, "error": str(error)} for error in errors)
    return sorted(answers, key=lambda answer: answer["position"])
