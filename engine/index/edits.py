"""Rewriting an index: ``compact`` (deleted samples out of their shards) and ``merge`` (the
shards of several indexes into one). Both write every new shard whole before the manifest
names it, and remove an old shard only after the manifest stops naming it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .store import MERGE_TENSORS, IndexMismatch, Shard, read_manifest, write_manifest, write_shard

if TYPE_CHECKING:
    from .index import Index


def compact(index: Index) -> int:
    """Rewrite the shards holding deleted samples; returns the bytes freed."""
    manifest, folder = index.manifest, index.folder
    deleted = set(manifest["deleted"])
    freed = 0
    for number, entry in enumerate(manifest["shards"]):
        if not entry["file"]:
            continue
        shard = Shard(folder / entry["file"], entry)
        keep = [p for p, i in enumerate(shard.ids) if i not in deleted]
        if len(keep) == len(shard.ids):
            continue
        old = folder / entry["file"]
        size = old.stat().st_size
        entry.update(file=None, samples=len(keep), tokens=sum(shard.sizes[p] for p in keep))
        if keep:
            entry["file"] = f"shard-{number:05d}-c{_generation(old)}.safetensors"
            write_shard(folder / entry["file"], _kept_tensors(shard, keep), [shard.ids[p] for p in keep],
                        [shard.meta[p] for p in keep])
            size -= (folder / entry["file"]).stat().st_size
        rewritten = set(shard.ids)
        manifest["deleted"] = [i for i in manifest["deleted"] if i not in rewritten]
        write_manifest(folder, manifest)
        old.unlink()
        freed += size
    return freed


def merge(folders: list[Path], out: Path) -> None:
    """The shards of ``folders`` (indexes built alike) copied into a new index ``out``."""
    if not folders:
        raise ValueError("merge needs at least one index")
    if (out / "index.json").exists():
        raise IndexMismatch(f"{out} already holds an index: merge into a new folder")
    manifests = [read_manifest(folder) for folder in folders]
    first = manifests[0]
    for folder, manifest in zip(folders[1:], manifests[1:], strict=True):
        for key in ("identity", "labelling"):
            if manifest[key] != first[key]:
                raise IndexMismatch(f"{folder} was built otherwise than {folders[0]} (its {key} differs): "
                                    f"only indexes of the same model, options and sketch merge")
    merged = {**first, "sources": [], "shards": [], "failed": [], "deleted": [], "build_shard": "merged"}
    seen: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    for folder, manifest in zip(folders, manifests, strict=True):
        renumber = [_source_number(merged["sources"], source) for source in manifest["sources"]]
        merged["failed"].extend({**f, "source": renumber[f["source"]]} for f in manifest["failed"])
        merged["deleted"].extend(manifest["deleted"])
        for entry in manifest["shards"]:
            entry = {**entry, "source": renumber[entry["source"]]}
            if entry["file"]:
                shard = Shard(folder / entry["file"], entry)
                repeated = seen.intersection(shard.ids)
                if repeated:
                    shutil.rmtree(out)
                    raise IndexMismatch(f"id {sorted(repeated)[0]!r} is in more than one of the indexes "
                                        f"merged: delete it from all but one first")
                seen.update(shard.ids)
                name = f"shard-{len(merged['shards']):05d}.safetensors"
                shutil.copyfile(folder / entry["file"], out / name)
                entry["file"] = name
            merged["shards"].append(entry)
    write_manifest(out, merged)


def _source_number(sources: list[dict], source: dict) -> int:
    """The number of ``source`` among ``sources`` (the same pool's parts share one), added if new."""
    for number, known in enumerate(sources):
        if known["fingerprint"] == source["fingerprint"]:
            return number
    sources.append(source)
    return len(sources) - 1


def _kept_tensors(shard: Shard, keep: list[int]) -> dict[str, torch.Tensor]:
    kept = shard.gather(keep)
    gone = sorted(set(range(len(shard.ids))).difference(keep))  # as a query took them out before
    tensors = {"hidden": kept.hidden, "errors": kept.errors, "gram": kept.gram,
               "sizes": shard.tensor("sizes")[keep], "rows": shard.tensor("rows")[keep],
               "moment_sum": shard.moments_without(gone)}
    return tensors | {name: shard.tensor(name)[keep] for name in MERGE_TENSORS if shard.has(name)}


def _generation(path: Path) -> int:
    """Compacted shards get a new name (a reader holding the old one keeps a whole file)."""
    stem = path.stem
    return int(stem.rsplit("-c", 1)[1]) + 1 if "-c" in stem else 1
