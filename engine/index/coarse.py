"""Coarse vectors: every stored sample ranked for a target in one pass (docs/design.md, "Index").

Each stored sample also gets a small vector, a sketch of its gradient whitened with a frozen
``P = C^-T C^-1`` (the pool's when first asked; ``CoarseStore``): ``x(a) = sum_t TS(u_t, z_t)``
(``TS``: the tensor sketch of ``u_t (x) z_t`` below; ``u_t`` the stored error sketch,
``z_t = C^-1 h_t``), ``COARSE_SIZE`` values. A target's vector is built the same way from
``y_s = C^T P' h_s`` (``P'`` the target's own, so ``y_s . z_t = h_s^T P' h_t``), and
``<x(a), x(target)>`` is an unbiased estimate of the target's value ``<G(a) P', G(target)>``
whatever ``P'``. The divisors kept beside the vectors are exact under the frozen ``P``: close to
a query's (the pool's now), not select's (the target's). From ``LISTS_FROM`` samples on, the
vectors have inverted lists (engine/index/lists.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import replace_atomically
from ..valuation.precondition import Preconditioner
from . import lists as inverted
from .layout import Target, sample_norms
from .store import SCAN_TOKENS, Shard

COARSE_SIZE = 4096  # values per coarse vector: 8 KiB in bfloat16; 1M of them read in about 0.45 s
CANDIDATES = 64  # stored samples per side of a query valued exactly, at least (4 top, if more)
COARSE_FOLDER, WHITENING_FILE, LISTS_FILE = "coarse", "whitening.safetensors", "lists.safetensors"


class CoarseSketch:
    """A tensor sketch (Pham and Pagh, 2013) of ``u_t (x) z_t``: count sketches of both sides
    (``COARSE_SIZE`` buckets, random signs, from the index's sketch seed: another stream than
    ``R``'s), circularly convolved. ``<x(a), x(b)>`` estimates ``sum (u_t . u_s)(z_t . z_s)``
    without bias, with a variance of about ``3 / COARSE_SIZE`` of the squared norms (in theory
    a fifth of the noise of a Gaussian sketch of each side to 32 and 64 values at 2048; the
    measured correlations are in bench/results/index.md)."""

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
    """Every live stored sample's coarse vector and divisor (exact under the frozen ``P``),
    with where it is stored (in index order)."""

    vectors: torch.Tensor  # (n, COARSE_SIZE) bfloat16
    norms: torch.Tensor  # (n,) float64
    places: torch.Tensor  # (n, 2) int64: (shard entry number, position in the shard)
    lists: inverted.Lists | None = None

    def estimates(self, queries: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``<x(a), q> / norm(a)`` for each stored sample ``a`` (or those at ``rows``) and each
        row ``q`` of ``queries``: ``(samples, queries)`` float64. One matrix-vector product per
        query: in bfloat16 it reads 1M vectors of 2048 values in 0.3 s on two cores, where a
        matrix product of bfloat16 takes 20 times longer."""
        x = self.vectors if rows is None else self.vectors[rows]
        norms = self.norms if rows is None else self.norms[rows]
        columns = [torch.mv(x, q.to(x.dtype)).double() for q in queries]
        return torch.stack(columns, dim=1) / norms[:, None]

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """Positions of the ``count`` samples of highest and of lowest estimate per query
        (from the lists' probed members where the vectors have lists; else one read of every
        vector serves both sides)."""
        if self.lists is None:
            found = self.estimates(queries)
            count = min(count, len(found))
            return torch.cat([found.topk(count, dim=0).indices.reshape(-1),
                              (-found).topk(count, dim=0).indices.reshape(-1)]).unique()
        chosen = []
        for side in (1, -1):
            for query, rows in zip(queries, self.lists.probed(queries, side), strict=True):
                found = side * self.estimates(query[None], rows)[:, 0]
                chosen.append(rows[found.topk(min(count, len(found))).indices])
        return torch.cat(chosen).unique()

    def by_shard(self, positions: torch.Tensor) -> dict[int, list[int]]:
        """``positions`` grouped by shard entry number: each one's positions in its shard."""
        numbers = self.places[positions, 0]
        return {number: self.places[positions[numbers == number], 1].tolist()
                for number in numbers.unique().tolist()}


class CoarseStore:
    """The coarse vectors on disk (``IDX/coarse/``): one file per shard, all whitened with one
    ``P`` frozen at first use (``whitening.safetensors``), so an append builds the new shards'
    vectors only, a delete builds nothing and a compacted shard is built again alone. Any ``P``
    would do for the estimates (they stay unbiased: the target side is moved with the same
    ``C``); the pool's when first asked keeps their noise low."""

    def __init__(self, folder: Path, sketch: CoarseSketch, seed: int) -> None:
        self.folder, self.sketch, self.seed = folder / COARSE_FOLDER, sketch, seed

    def whitening(self, pool: Preconditioner | None) -> Preconditioner | None:
        """The frozen ``P`` for ``pool``'s damping (None: no whitening): the saved one, else
        ``pool`` (the pool's ``P`` now), saved."""
        if pool is None:
            return None
        path, stamp = self.folder / WHITENING_FILE, {"damping": repr(pool.damping)}
        saved = _read(path, stamp)
        if saved is not None:
            return Preconditioner(saved["moment_sum"], int(saved["tokens"]), pool.damping)
        self.folder.mkdir(exist_ok=True)
        _write(path, {"moment_sum": pool.moment_sum, "tokens": torch.tensor(pool.tokens)}, stamp)
        return pool

    def shard_vectors(self, entry: dict, shard: Shard, pre: Preconditioner | None,
                      pre_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample of ``shard``: its coarse vector and cosine norm under ``pre`` (whose
        ``whitening_id`` is ``pre_id``); saved, else built (one read of the shard) and saved."""
        stamp = {"entry": entry, "whitening": pre_id, "seed": self.seed, "size": COARSE_SIZE}
        path = self._path(entry["file"])
        saved = _read(path, stamp)
        if saved is not None:
            return saved["vectors"], saved["norms"]
        vectors, norms = [], []
        for chunk in shard.chunks(SCAN_TOKENS):
            z = chunk.hidden.float() if pre is None else pre.whiten(chunk.hidden.float())
            vectors.append(self.sketch.vectors(z, chunk.errors, chunk.sizes).to(torch.bfloat16))
            norms.append(sample_norms(z, chunk.gram, chunk.sizes, "cosine"))
        found = {"vectors": torch.cat(vectors), "norms": torch.cat(norms)}
        self.folder.mkdir(exist_ok=True)
        _write(path, found, stamp)
        return found["vectors"], found["norms"]

    def lists(self, vectors: CoarseVectors, stamp: dict) -> inverted.Lists:
        """The inverted lists of ``vectors`` (the live samples of one state of the index)."""
        path = self.folder / LISTS_FILE
        saved = inverted.Lists.from_tensors(_read(path, stamp) or {})
        if saved is not None:
            return saved
        lists = inverted.build(vectors.vectors, vectors.norms, self.seed)
        _write(path, lists.tensors(), stamp)
        return lists

    def forget_others(self, files: set[str]) -> None:
        """Remove the vectors of shards no longer in the index (compacted, or merged away)."""
        keep = {self._path(f).name for f in files} | {WHITENING_FILE, LISTS_FILE}
        for path in self.folder.glob("*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def _path(self, shard_file: str) -> Path:
        return self.folder / shard_file


def disk_bytes(index_folder: Path) -> int:
    """Bytes of the coarse vectors, lists and whitening saved beside an index's shards."""
    return sum(path.stat().st_size for path in (index_folder / COARSE_FOLDER).glob("*.safetensors"))


def divisors(cosine: torch.Tensor, counts: list[int], normalize: str) -> torch.Tensor:
    """A sample's divisor under ``normalize``, from its cosine norm and its label tokens."""
    empty = torch.empty(0)
    return cosine if normalize == "cosine" else sample_norms(empty, empty, counts, normalize)


def whitening_id(pre: Preconditioner | None) -> str:
    """What a ``P`` was factored from (a digest of its moments: computed once per use)."""
    if pre is None:
        return "none"
    digest = hashlib.sha256(pre.moment_sum.to(torch.float64).numpy().tobytes())
    return f"{digest.hexdigest()[:32]}/{pre.tokens}/{pre.damping!r}"


def _write(path: Path, tensors: dict[str, torch.Tensor], stamp: dict) -> None:
    metadata = {"stamp": json.dumps(stamp, sort_keys=True)}
    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata))


def _read(path: Path, stamp: dict) -> dict[str, torch.Tensor] | None:
    """The tensors saved at ``path`` for ``stamp``, else None (absent, stale or unreadable:
    built again)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("stamp") != json.dumps(stamp, sort_keys=True):
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, ValueError):
        return None
