"""``Index``: the pool valued once, any target answered from the store (docs/design.md, "Index").

``Index.build`` runs the pool through the engine once and stores each sample's label states and
sketched errors (engine/index/layout.py) in shards (engine/index/store.py). A target then costs
its own forward pass and one scan of the shards: ``values`` (against a validation set: select's
value), ``select`` (the top share or round-robin) and ``query`` (each sample's most and least
valuable training samples). The index also grows (``append``), forgets (``delete``, then
``compact``) and joins (``merge``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import INDEX_BUILD, INDEX_QUERY, ValuationConfig
from ..inputs.samples import SampleError, sample_id_of
from ..model.loading import ValuationModel
from ..valuation.precondition import Preconditioner, resolve_damping
from ..valuation.ranking import choose
from ..valuator import Valuator
from . import coarse
from .layout import SKETCH_ROWS, Sketch, Target, moments_of, stored_sketch, target_of
from .metadata import Where, check_where, describe_where, matches
from .results import IndexValues, exact_rows, ranked_answers
from .search import CoarseSearch
from .store import (
    SCAN_TOKENS,
    IndexMismatch,
    Shard,
    ShardChunk,
    check_model,
    claim_folder,
    covered_rows,
    describe,
    fingerprint,
    new_manifest,
    read_manifest,
    write_manifest,
)
from .writer import SHARD_SAMPLES, ShardWriter, check_build_options, default_id, read_source, samples_of

# The options that decide what is stored (how samples are labelled and read); the others
# (normalize, precondition, damping) are chosen per query.
STORED_OPTIONS = ("loss_on", "skip_depth", "append_eos", "max_length")


class Index:
    """An index folder, opened; ``model`` is needed for what runs samples (build, append, the
    target's side of a query), not for ``info``, ``delete``, ``compact`` or ``merge``."""

    def __init__(self, folder: str | Path, model: ValuationModel | None = None,
                 config: ValuationConfig | None = None, *, progress: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.progress = progress
        labelling = self.manifest["labelling"]
        self.config = (config or ValuationConfig.for_command(INDEX_QUERY, **labelling))
        differences = [f"{key}: the index has {value!r}, asked for {getattr(self.config, key)!r}"
                       for key, value in labelling.items() if getattr(self.config, key) != value]
        if differences:
            raise IndexMismatch(f"{self.folder} was built with other options ({'; '.join(differences)}): "
                                f"query with the index's, or build another index")
        self.valuator = None if model is None else Valuator(model, config=self.config, progress=progress)
        if self.valuator is not None:
            check_model(self.folder, self.manifest, self.valuator.model)
        self._shards: dict[str, Shard] = {}
        # Read once per state of the index (its fingerprint and the options): a query in a
        # server reads neither the shards' moments nor the coarse vectors again.
        self._held_pool: tuple[str, Preconditioner | None] | None = None
        self._search = CoarseSearch(self)

    # ------------------------------------------------------------------ making one

    @classmethod
    def open(cls, folder: str | Path, model: ValuationModel | None = None,
             config: ValuationConfig | None = None, *, progress: bool = True) -> Index:
        return cls(folder, model, config, progress=progress)

    @classmethod
    def build(cls, train: Sequence[dict] | str | Path, out: str | Path, *, model: ValuationModel,
              config: ValuationConfig | None = None, sketch_rows: int = SKETCH_ROWS, seed: int = 0,
              storage: str = "bfloat16", max_tokens: int | None = None, shard: tuple[int, int] = (0, 1),
              shard_samples: int = SHARD_SAMPLES, overwrite: bool = False, progress: bool = True) -> Index:
        """Store the pool ``train`` (samples, or a file of them) in ``out``; a rerun of the same
        build resumes, another one is refused unless ``overwrite``. ``shard=(i, n)`` stores the
        ``i``-th of ``n`` contiguous parts of the pool (join the parts with ``merge``).
        ``config``: how samples are labelled and read, and how the returned index values
        (without one: select's readout and values). ``max_tokens``: a longer sample's tokens
        are stored merged to that many (engine/index/layout.py, ``merge_tokens``)."""
        check_build_options(storage, sketch_rows, max_tokens)
        index, n = shard
        if not 0 <= index < n:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{n}")
        given, config = config, config or ValuationConfig.for_command(INDEX_BUILD)
        valuator = Valuator(model, config=config, progress=progress)
        sketch = Sketch(valuator.model.vocab_size, sketch_rows, seed)
        matrix = sketch.matrix()
        samples, source = samples_of(train)
        labelling = {key: getattr(config, key) for key in STORED_OPTIONS}
        manifest = new_manifest(valuator.model, labelling, sketch.describe(matrix), storage, source,
                                f"{index}/{n}", max_tokens)
        folder = Path(out)
        claim_folder(folder, manifest, overwrite)
        manifest = read_manifest(folder)
        rows = range(len(samples) * index // n, len(samples) * (index + 1) // n)
        ShardWriter(folder, manifest, valuator, matrix, shard_samples=shard_samples,
                    progress=progress).fill(0, samples, rows)
        return cls(folder, model, given, progress=progress)

    def append(self, train: Sequence[dict] | str | Path, *, shard_samples: int = SHARD_SAMPLES) -> int:
        """Store more samples (a new source; a rerun of an interrupted append resumes it);
        returns how many were stored. Ids must be new: give samples an "id" to be sure."""
        valuator = self._needs_model("append")
        samples, source = samples_of(train)
        sources = self.manifest["sources"]
        number = next((i for i, s in enumerate(sources) if s["fingerprint"] == source["fingerprint"]),
                      len(sources))
        covered = covered_rows(self.manifest, number)
        repeated = set(self.ids()).intersection(
            sample_id_of(sample, default_id(number, row)) for row, sample in enumerate(samples)
            if row not in covered)
        if repeated:
            raise IndexMismatch(f"{len(repeated)} appended sample id(s) are already in the index (e.g. "
                                f"{sorted(repeated)[0]!r}): give the samples unique \"id\" fields")
        if number == len(sources):
            sources.append(source)
        before = self.samples
        writer = ShardWriter(self.folder, self.manifest, valuator, self._sketch,
                             shard_samples=shard_samples, progress=self.progress)
        writer.fill(number, samples, range(len(samples)))
        return self.samples - before

    # ------------------------------------------------------------------ reading

    @property
    def samples(self) -> int:
        """Samples stored and not deleted."""
        return sum(e["samples"] for e in self.manifest["shards"]) - len(self.manifest["deleted"])

    @property
    def fingerprint(self) -> str:
        """A digest of what answers a query: the identity, the shards and the deleted ids."""
        return fingerprint(self.manifest)

    def ids(self) -> list[str]:
        return [shard.ids[p] for _, shard, live in self.live_shards() for p in live]

    def source_samples(self, source: int) -> Sequence[dict]:
        """The samples of a source (a training file) read again, checked to be what was stored."""
        return read_source(self.manifest["sources"][source])

    def info(self) -> dict[str, Any]:
        """What the index holds, how it was built and its size on disk."""
        entries = self._entries()
        return {"folder": str(self.folder), "samples": self.samples,
                **describe(self.folder, self.manifest, [self._shard(e) for e in entries]),
                "coarse_bytes": coarse.disk_bytes(self.folder)}

    def values(self, valid: Sequence[dict], *, columns: str = "mean", shortlist: float | None = None,
               where: Where | None = None) -> IndexValues:
        """Every stored sample's value against the validation set ``valid``: one column, the
        value against their mean (``columns="mean"``, select's), or one per sample ("each").
        ``shortlist``: the share of the pool valued exactly per column (those of highest coarse
        estimate; engine/index/search.py), the rest estimated; by default all valued exactly.
        ``where``: only the stored samples whose metadata it accepts (engine/index/metadata.py)."""
        return self.values_many([valid], columns=columns, shortlist=shortlist, where=where)[0]

    def values_many(self, targets: Sequence[Sequence[dict]], *, columns: str = "mean",
                    shortlist: float | None = None, where: Where | None = None) -> list[IndexValues]:
        """``values`` for several validation sets in one scan of the index."""
        if columns not in ("mean", "each"):
            raise ValueError(f"columns must be 'mean' or 'each', got {columns!r}")
        if shortlist is not None and not 0 <= shortlist <= 1:
            raise ValueError(f"shortlist must be a share of the pool in [0, 1], got {shortlist}")
        where = self._filter(where, shortlisted=shortlist is not None)
        built = [self.prepare_target(valid, columns, from_pool=False) for valid in targets]
        if shortlist is not None:
            ids, sources, rows = self._listing()
            found = [(self._search.values(target, shortlist), errors) for target, errors in built]
            return [IndexValues(ids, sources, rows, values, errors, estimated)
                    for (values, estimated), errors in found]
        (ids, sources, rows), values = self._listing(where), self.scan([t for t, _ in built], where)
        out, start = [], 0
        for target, errors in built:
            out.append(IndexValues(ids, sources, rows, values[:, start:start + target.groups], errors))
            start += target.groups
        return out

    def select(self, valid: Sequence[dict], ratio: float, *, strategy: str = "top",
               shortlist: float | None = None, where: Where | None = None) -> list[str]:
        """The ids of the ``ceil(ratio n)`` stored samples of highest value (``top``) or taken
        in turn by the validation samples (``round-robin``), in index order. ``shortlist=m``:
        choose among the ``m x`` that many samples the coarse vectors rank highest, valued
        exactly (``m = 0``: choose on the coarse estimates; engine/index/search.py).
        ``where``: choose among the samples whose metadata it accepts (``n`` of them)."""
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
        if shortlist is not None and not shortlist >= 0:
            raise ValueError(f"shortlist must be >= 0 (a multiple of the budget), got {shortlist}")
        columns = "mean" if strategy == "top" else "each"
        if shortlist is None:
            found = self.values(valid, columns=columns, where=where)
            return [found.ids[i] for i in sorted(choose(found.values, ratio, strategy))]
        self._filter(where, shortlisted=True)
        groups = 1 if strategy == "top" else len(valid)  # round-robin: each takes ratio / groups
        target, _ = self.prepare_target(valid, columns, from_pool=False)
        values, estimated = self._search.values(target, min(1.0, shortlist * ratio / groups))
        rows = exact_rows(estimated)
        chosen = choose(values[rows], ratio, strategy, keep=math.ceil(ratio * len(values)))
        return self._search.ids(rows[sorted(chosen)])

    def query(self, samples: Sequence[dict], *, top: int = 10, exact: bool = False,
              where: Where | None = None) -> list[dict[str, Any]]:
        """Per sample: the ``top`` stored samples of highest and of lowest value for it, with
        their values; ``P`` from the pool (one sample has no covariance of its own). Unless
        ``exact`` or ``where`` (among the samples whose metadata it accepts: every one of them
        valued), a pool larger than the candidates is first narrowed by coarse vectors
        (engine/index/search.py) and only the candidates are valued from the stored tokens."""
        where = self._filter(where, shortlisted=False)
        target, errors = self.prepare_target(samples, "each", from_pool=True)
        if exact or where or self.samples <= 2 * max(coarse.CANDIDATES, 4 * top):
            ids, values = self._listing(where)[0], self.scan([target], where)
        else:
            ids, values = self._search.query(target, top)
        return ranked_answers(ids, values, len(samples), errors, top)

    def prepare_queries(self) -> None:
        """Read (or build) what queries use: the pool's ``P`` and, on a pool large enough to be
        shortlisted, the coarse vectors (a server does this before its first Query)."""
        self.pool_preconditioner()
        if self.samples > 2 * coarse.CANDIDATES:
            self._search.vectors()

    # ------------------------------------------------------------------ editing

    def delete(self, ids: Sequence[str]) -> int:
        """Forget samples by id (they leave every later answer; ``compact`` frees their bytes)."""
        live = set(self.ids())
        unknown = [i for i in ids if i not in live]
        if unknown:
            raise IndexMismatch(f"{len(unknown)} id(s) not in the index, e.g. {unknown[0]!r}")
        self.manifest["deleted"].extend(dict.fromkeys(ids))
        write_manifest(self.folder, self.manifest)
        return len(set(ids))

    def compact(self) -> int:
        """Rewrite the shards that hold deleted samples without them; returns bytes freed."""
        from .edits import compact

        freed = compact(self)
        self._shards.clear()
        return freed

    @staticmethod
    def merge(folders: Sequence[str | Path], out: str | Path) -> Index:
        """One index of the shards of several (the parts of a ``--shard`` build, or indexes of
        other pools) built alike; ids must not repeat."""
        from .edits import merge

        merge([Path(f) for f in folders], Path(out))
        return Index(out)

    # ------------------------------------------------------------------ internals

    def _needs_model(self, what: str) -> Valuator:
        if self.valuator is None:
            raise ValueError(f"{what} runs samples through the model: open the index with model=")
        return self.valuator

    def _entries(self) -> list[dict[str, Any]]:
        return [e for e in self.manifest["shards"] if e["file"]]

    def _shard(self, entry: dict[str, Any]) -> Shard:
        if entry["file"] not in self._shards:
            self._shards[entry["file"]] = Shard(self.folder / entry["file"], entry)
        return self._shards[entry["file"]]

    def shard(self, number: int) -> Shard:
        """The shard of manifest entry ``number``, opened once."""
        return self._shard(self.manifest["shards"][number])

    def live_shards(self, where: Where | None = None) -> Iterator[tuple[int, Shard, list[int]]]:
        """(entry number, shard, the positions of its samples not deleted and accepted by
        ``where``), in index order."""
        where = check_where(where)  # values as text, as ``matches`` compares them
        deleted = set(self.manifest["deleted"])
        for number, entry in enumerate(self.manifest["shards"]):
            if entry["file"]:
                shard = self._shard(entry)
                yield number, shard, [p for p, i in enumerate(shard.ids) if i not in deleted
                                      and (where is None or matches(shard.meta[p], where))]

    def _filter(self, where: Where | None, *, shortlisted: bool) -> Where | None:
        """``where`` checked: it must accept a stored sample, and the coarse routes do not filter."""
        where = check_where(where)
        if where is None:
            return None
        if shortlisted:
            raise ValueError("a metadata filter (where) values every accepted sample exactly: "
                             "drop the shortlist")
        if not any(live for _, _, live in self.live_shards(where)):
            raise ValueError(f"no stored sample has the metadata asked for ({describe_where(where)})")
        return where

    @functools.cached_property
    def _sketch(self) -> torch.Tensor:
        return stored_sketch(self.folder, self.manifest["identity"])

    def prepare_target(self, samples: Sequence[dict], columns: str,
                       from_pool: bool) -> tuple[Target, list[SampleError]]:
        """The target of ``samples`` (their forward pass; ``P`` from them, or from the pool),
        and their bad samples."""
        valuator = self._needs_model("a query")
        if not samples:
            raise ValueError("no samples to query with")
        states, errors = valuator.label_states(samples, errors="collect")
        states = [s for s in states if s is not None]
        if not states:
            raise ValueError(f"no valid sample to query with (the first error: {errors[0]})")
        config = self.config
        if from_pool or config.precondition is None:
            pre = self.pool_preconditioner()
        else:
            damping = resolve_damping(config.precondition, config.damping, from_pool=False)
            pre = Preconditioner(*moments_of(states), damping)
        return target_of(states, valuator.math, self._sketch, pre, config.normalize, columns), errors

    def pool_preconditioner(self) -> Preconditioner | None:
        """``P`` from the pool's stored moments with a query's damping (None without
        preconditioning), factored once per state of the index."""
        config = self.config
        if config.precondition is None:
            return None
        damping = resolve_damping(config.precondition, config.damping, from_pool=True)
        key = f"{self.fingerprint}/{damping!r}"
        if self._held_pool is None or self._held_pool[0] != key:
            self._held_pool = (key, Preconditioner(*self._pool_moments(), damping))
        return self._held_pool[1]

    def _pool_moments(self) -> tuple[torch.Tensor, int]:
        """The pool's ``sum h h^T`` and token count, deleted samples taken out."""
        total, tokens = None, 0
        for _, shard, live in self.live_shards():
            part = shard.moments_without(sorted(set(range(len(shard.ids))).difference(live)))
            total = part if total is None else total + part
            tokens += sum(shard.counts[p] for p in live)
        if total is None or tokens == 0:
            raise ValueError(f"{self.folder} holds no sample")
        return total, tokens

    def _listing(self, where: Where | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Ids, sources and rows of every live stored sample, in index order (a scan's)."""
        ids, sources, rows = [], [], []
        for number, shard, live in self.live_shards(where):
            ids.extend(shard.ids[p] for p in live)
            rows.extend(shard.rows[p] for p in live)
            sources.extend([self.manifest["shards"][number]["source"]] * len(live))
        return ids, np.asarray(sources, dtype=np.int64), np.asarray(rows, dtype=np.int64)

    def scan(self, targets: list[Target], where: Where | None = None) -> np.ndarray:
        """Values of every live stored sample (in ``_listing``'s order) against every group of
        ``targets``, one chunk of one shard in memory at a time."""
        parts = [torch.cat([t.values(c.hidden, c.errors, c.gram, c.sizes, counts=c.counts) for t in targets],
                           dim=1)[live].numpy() for c, live in self._live_chunks(where)]
        return np.concatenate(parts) if parts else np.zeros((0, sum(t.groups for t in targets)))

    def _live_chunks(self, where: Where | None = None) -> Iterator[tuple[ShardChunk, list[int]]]:
        """(chunk, the chunk's rows not deleted and accepted) over every stored sample."""
        count = len(self._entries())
        shards = tqdm(self.live_shards(where), total=count, desc="scan", unit="shard",
                      disable=not self.progress or count < 2)
        for _, shard, live in shards:
            if not live:
                continue
            keep = set(live)
            for chunk in shard.chunks(SCAN_TOKENS, keep if len(keep) < len(shard.ids) else None):
                yield chunk, [j for j, p in enumerate(chunk.positions) if p in keep]
