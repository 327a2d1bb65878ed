"""The index on disk: a folder of shards and a manifest (docs/design.md, "Index").

    IDX/index.json            the manifest: format version, identity, sketch, sources, shards,
                              deleted ids; replaced atomically after every shard
    IDX/shard-00000.safetensors  one shard: ``hidden`` (tokens x D), ``errors`` (tokens x k),
                              ``gram`` (sum T^2), ``sizes`` and ``rows`` (per sample), the shard's
                              ``moment_sum`` (sum h h^T, float64), its ids and the samples'
                              ``"meta"`` objects in the header (engine/index/metadata.py); an
                              index that merges long samples' tokens adds ``counts`` (label
                              tokens) and ``energy_kept`` per sample
    IDX/coarse/               what the fast routes read, rebuilt when missing (engine/index/coarse.py)

Safetensors because a shard is a few dense arrays read in token ranges: ``safe_open`` checks
the header against the file's size (a truncated shard is caught on open), then the arrays are
read as views of the mapped file, so a scan holds one chunk at a time, a gather of scattered
samples is one indexing, and the index can be larger than memory; the format is a standard one
any language reads. A shard is written whole
(temporary file, fsync, rename) before the manifest names it: after a kill, the manifest names
only complete shards and a rerun builds the rest.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import replace_atomically, write_atomically
from ..version import __version__
from .metadata import decode_metadata, encode_metadata

if TYPE_CHECKING:
    from ..model.loading import ValuationModel

FORMAT = "forvalue.index/1"
SHARD_FORMAT = "forvalue.index-shard/1"
MANIFEST = "index.json"
STORAGE = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TENSORS = ("hidden", "errors", "gram", "sizes", "rows", "moment_sum")
MERGE_TENSORS = ("counts", "energy_kept")  # per sample, in the shards of an index with max_tokens
SCAN_TOKENS = 16384  # stored tokens read (and valued) at a time


class IndexMismatch(ValueError):
    """An index that cannot be read, or one used with what it was not built with."""


@dataclass
class ShardChunk:
    """Consecutive samples of one shard, read back."""

    hidden: torch.Tensor
    errors: torch.Tensor
    gram: torch.Tensor
    sizes: list[int]  # tokens stored per sample
    positions: range | list[int]  # the samples' positions in the shard
    counts: list[int]  # label tokens per sample (more than ``sizes`` where merged)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexMismatch(f"{folder} is not a forvalue index (no {MANIFEST}): build one with "
                          f"`forvalue index build`") from None
    except (OSError, ValueError) as error:
        raise IndexMismatch(f"cannot read {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise IndexMismatch(f"{path} is not an index of this version (format {found!r}, this reads "
                          f"{FORMAT!r}): rebuild it")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_atomically(folder / MANIFEST, lambda file: json.dump(manifest, file, indent=1))


def write_shard(path: Path, tensors: dict[str, torch.Tensor], ids: list[str],
                metas: Sequence[dict[str, Any]] = ()) -> None:
    """``metas``: each sample's metadata (engine/index/metadata.py), kept beside the ids."""
    metadata = {"format": SHARD_FORMAT, "ids": json.dumps(ids)}
    if (meta := encode_metadata(metas)) is not None:
        metadata["meta"] = meta
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    replace_atomically(path, lambda tmp: save_file(contiguous, tmp, metadata))


def moment_sum(hidden: torch.Tensor) -> torch.Tensor:
    """``sum h h^T`` in float64 of the states as stored (so deleting them subtracts exactly)."""
    h = hidden.to(torch.float64)
    return h.T @ h


class Shard:
    """One shard file, opened (mapped); its samples read in chunks of whole samples."""

    def __init__(self, path: Path, entry: dict[str, Any]) -> None:
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            metadata = self._file.metadata() or {}
            missing = [name for name in TENSORS if name not in self._file.keys()]
            if metadata.get("format") != SHARD_FORMAT or missing:
                raise IndexMismatch(f"index shard {path} is not a shard of this version (missing {missing})")
            self.ids: list[str] = json.loads(metadata["ids"])
            self._meta_text = metadata.get("meta")
            self.sizes = self._file.get_tensor("sizes").tolist()
            self.rows = self._file.get_tensor("rows").tolist()
            self.counts = self._file.get_tensor("counts").tolist() if self.has("counts") else self.sizes
        except (OSError, SafetensorError, KeyError, ValueError) as error:
            if isinstance(error, IndexMismatch):
                raise
            raise IndexMismatch(f"index shard {path} is truncated or corrupt ({error}): rebuild it "
                              f"(`forvalue index build` resumes from the shards before it)") from None
        if len(self.ids) != entry["samples"] or sum(self.sizes) != entry["tokens"] or \
                len(self.counts) != len(self.sizes):
            raise IndexMismatch(f"index shard {path} does not hold what the manifest says ({len(self.ids)} "
                              f"samples, {sum(self.sizes)} tokens; expected {entry['samples']}, "
                              f"{entry['tokens']}): rebuild it")
        self.token_starts = list(itertools.accumulate(self.sizes, initial=0))
        self.gram_starts = list(itertools.accumulate((n * n for n in self.sizes), initial=0))
        self._mapped = _mapped(path, ("hidden", "errors", "gram"))

    @functools.cached_property
    def meta(self) -> list[dict[str, Any]]:
        """Each sample's ``"meta"`` object, decoded on first use (only a filter or a
        compaction needs them; a scan of a large index does not hold them)."""
        try:
            return decode_metadata(self._meta_text, len(self.ids))
        except ValueError as error:
            raise IndexMismatch(f"index shard {self.path} has corrupt metadata ({error}): "
                                f"rebuild it") from None

    def tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def moments_without(self, gone: list[int]) -> torch.Tensor:
        """The shard's ``sum h h^T`` less the stored states' of the samples at ``gone`` (of a
        merged sample, the part its merged states carry: the rest stays; docs/design.md)."""
        part = self.tensor("moment_sum")
        return part - moment_sum(self.gather(gone).hidden) if gone else part

    def has(self, name: str) -> bool:
        return name in self._file.keys()

    def chunks(self, max_tokens: int, keep: set[int] | None = None) -> Iterator[ShardChunk]:
        """Consecutive samples of at most ``max_tokens`` label tokens (or one longer sample);
        ``keep``: the positions to read (the others, deleted ones, are skipped)."""
        start = 0
        while start < len(self.sizes):
            stop = start + 1
            starts = self.token_starts
            while stop < len(self.sizes) and starts[stop + 1] - starts[start] <= max_tokens:
                stop += 1
            positions = range(start, stop)
            if keep is None or any(p in keep for p in positions):
                yield self._read(positions)
            start = stop

    def gather(self, positions: list[int]) -> ShardChunk:
        """The samples at ``positions`` (any order): one indexed read of each mapped array."""
        tokens = _ranges(self.token_starts, positions)
        grams = _ranges(self.gram_starts, positions)
        hidden, errors, gram = (self._mapped[name] for name in ("hidden", "errors", "gram"))
        return ShardChunk(hidden[tokens], errors[tokens], gram[grams], [self.sizes[p] for p in positions],
                          positions, [self.counts[p] for p in positions])

    def _read(self, positions: range) -> ShardChunk:
        first, last = positions.start, positions.stop
        tokens = slice(self.token_starts[first], self.token_starts[last])
        grams = slice(self.gram_starts[first], self.gram_starts[last])
        return ShardChunk(self._mapped["hidden"][tokens], self._mapped["errors"][tokens],
                          self._mapped["gram"][grams], self.sizes[first:last], positions,
                          self.counts[first:last])


# safetensors' dtype names, as numpy reads their bytes and torch sees them
_DTYPES = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16),
           "F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64),
           "I64": (np.int64, torch.int64)}


def _mapped(path: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors of a (checked) safetensors file as views of the mapped file: a read of any rows
    is one indexing, with no copy of what is not read (copy-on-write: the file is never changed)."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    views = {}
    for name in names:
        described = header[name]
        numpy_dtype, torch_dtype = _DTYPES[described["dtype"]]
        start, end = described["data_offsets"]
        shape = tuple(described["shape"])
        if end == start:
            views[name] = torch.zeros(shape, dtype=torch_dtype)
            continue
        array = np.memmap(path, dtype=numpy_dtype, mode="c", offset=8 + length + start, shape=shape)
        views[name] = torch.from_numpy(array).view(torch_dtype)
    return views


def _ranges(starts: list[int], positions: list[int]) -> torch.Tensor:
    """The indices ``starts[p] .. starts[p + 1] - 1`` of each position ``p``, one after another."""
    bounds = np.asarray(starts, dtype=np.int64)
    first, lengths = bounds[positions], bounds[np.asarray(positions, dtype=np.int64) + 1] - bounds[positions]
    shift = first - (np.cumsum(lengths) - lengths)  # each range's first index, less where it lands
    return torch.from_numpy(np.repeat(shift, lengths) + np.arange(lengths.sum()))


def covered_rows(manifest: dict[str, Any], source: int) -> set[int]:
    """The rows of ``source`` that shards cover (stored, or bad and recorded as failed)."""
    return {row for entry in manifest["shards"] if entry["source"] == source for row in range(*entry["rows"])}


def fingerprint(manifest: dict[str, Any]) -> str:
    """A digest of what answers a query: the identity, the shards and the deleted ids."""
    content = json.dumps([manifest["identity"], manifest["labelling"], manifest["shards"],
                          sorted(manifest["deleted"])], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def describe(folder: Path, manifest: dict[str, Any], shards: list[Shard]) -> dict[str, Any]:
    """``info`` of an index: what the manifest says, bytes on disk, bytes per stored sample
    (the per-shard covariance left out, it does not grow with samples) and, where long
    samples' tokens were merged, how many and the least share of error energy kept."""
    entries = [e for e in manifest["shards"] if e["file"]]
    sizes = [shard.sizes for shard in shards]
    identity = manifest["identity"]
    count, tokens = sum(len(s) for s in sizes), sum(map(sum, sizes))
    width = STORAGE[identity["storage"]].itemsize
    per_token = (int(identity["hidden_size"]) + identity["sketch"]["rows"]) * width
    squares = sum(n * n for shard in sizes for n in shard)
    per_sample = 16 if identity.get("max_tokens") is None else 28  # sizes, rows (+ counts, energy_kept)
    sources = [{**source, "rows_stored": len(covered_rows(manifest, number))}
               for number, source in enumerate(manifest["sources"])]
    return {"format": FORMAT, "model": manifest["model_name"], "deleted": len(manifest["deleted"]),
            "failed": len(manifest["failed"]), "label_tokens": tokens, "shards": len(entries),
            "bytes": sum((folder / e["file"]).stat().st_size for e in entries),
            "bytes_per_sample": (tokens * per_token + squares * 4) / count + per_sample if count else 0.0,
            "storage": identity["storage"], "sketch": identity["sketch"],
            "hidden_features": int(identity["hidden_size"]), "labelling": manifest["labelling"],
            "sources": sources, "forvalue_version": identity["forvalue_version"],
            **merging(identity, shards)}


def merging(identity: dict[str, Any], shards: list[Shard]) -> dict[str, Any]:
    """What ``max_tokens`` did to the stored samples (nothing to say without it)."""
    if identity.get("max_tokens") is None:
        return {}
    merged = [float(kept) for shard in shards for kept, count, size
              in zip(shard.tensor("energy_kept"), shard.counts, shard.sizes, strict=True) if count > size]
    return {"max_tokens": identity["max_tokens"], "merged_samples": len(merged),
            "least_energy_kept": min(merged, default=1.0)}


def new_manifest(model: ValuationModel, labelling: dict[str, Any], sketch: dict[str, Any], storage: str,
                 source: dict[str, Any], shard: str, max_tokens: int | None = None) -> dict[str, Any]:
    """The manifest of an index about to be built (``max_tokens`` named only when set: an
    index without it is what earlier versions built)."""
    identity = {key: value for key, value in model.identity.items() if key != "model_name"}
    identity.update(sketch=sketch, storage=storage, forvalue_version=__version__)
    if max_tokens is not None:
        identity["max_tokens"] = max_tokens
    return {"format": FORMAT, "model_name": model.name, "identity": identity, "labelling": labelling,
            "sources": [source], "build_shard": shard, "shards": [], "failed": [], "deleted": []}


def claim_folder(folder: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Resume the same build in ``folder``, start a new one, or refuse another build's folder."""
    if (folder / "index.json").exists() and not overwrite:
        recorded = read_manifest(folder)
        keys = ("identity", "labelling", "build_shard")
        differences = [key for key in keys if recorded.get(key) != manifest[key]]
        if "identity" in differences:  # name what differs (the sketch, max_tokens, the model...)
            ours, theirs = manifest["identity"], recorded["identity"]
            named = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            differences[0] = f"identity: {', '.join(named)}"
        if recorded["sources"][0]["fingerprint"] != manifest["sources"][0]["fingerprint"]:
            differences.append("the training samples")
        if differences:
            raise IndexMismatch(f"{folder} holds an index built otherwise ({', '.join(differences)} "
                                f"differ): pass --overwrite to start over, or choose another --out")
        return
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, manifest)


def check_model(folder: Path, manifest: dict[str, Any], model: ValuationModel) -> None:
    """Refuse a model (weights, adapter, tokenizer, readout) other than the index's."""
    ours = {key: value for key, value in model.identity.items() if key != "model_name"}
    recorded = manifest["identity"]
    differences = [f"{key}: index {recorded.get(key)!r}, model {value!r}" for key, value in ours.items()
                   if recorded.get(key) != value]
    if differences:
        raise IndexMismatch(f"{folder} was built with another model, adapter or tokenizer than "
                            f"{model.name} ({'; '.join(differences[:3])}): open it with the "
                            f"index's model ({manifest['model_name']}) or build another index")
