"""Writing an index: the pool's samples through the engine, a shard at a time.

Each shard holds ``shard_samples`` consecutive rows of one source (a training file); it is
written whole, then the manifest names it, so a build or append that is killed resumes from
the shards the manifest names (rows a shard covers are never valued twice). Rows whose sample
is bad are recorded in the manifest with the reason and stored nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..inputs.readers import read_samples
from ..inputs.samples import SampleError, sample_fingerprint, sample_id_of, subset_of
from ..valuator import Valuator
from .layout import Encoded, encode, merge_tokens
from .metadata import sample_metadata
from .store import STORAGE, IndexMismatch, covered_rows, moment_sum, write_manifest, write_shard

SHARD_SAMPLES = 2048  # rows per shard: about 100 MB at 50 KiB per sample, one shard in memory


def check_build_options(storage: str, sketch_rows: int, max_tokens: int | None) -> None:
    """Refuse what no build can use (before a model loads, or a Ray job starts)."""
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {tuple(STORAGE)}, got {storage!r}")
    if sketch_rows < 0 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"sketch_rows must be >= 0 (0: the identity sketch) and max_tokens >= 1, got "
                         f"{sketch_rows} and {max_tokens}")


def default_id(source: int, row: int) -> str:
    """The id of a sample without one: its row, prefixed by its source after the first."""
    return str(row) if source == 0 else f"{source}:{row}"


class ShardWriter:
    """Values rows of a source with ``valuator`` and appends them to the index in ``folder``."""

    def __init__(self, folder: Path, manifest: dict[str, Any], valuator: Valuator, sketch: torch.Tensor,
                 *, shard_samples: int = SHARD_SAMPLES, progress: bool = True) -> None:
        if shard_samples < 1:
            raise ValueError(f"shard_samples must be positive, got {shard_samples}")
        self.folder, self.manifest, self.valuator = folder, manifest, valuator
        self.sketch = sketch
        self.storage = STORAGE[manifest["identity"]["storage"]]
        self.max_tokens: int | None = manifest["identity"].get("max_tokens")
        self.shard_samples = shard_samples
        self.progress = progress

    def fill(self, source: int, samples: Sequence[dict], rows: range) -> None:
        """Store the rows of ``rows`` that no shard covers yet."""
        covered = covered_rows(self.manifest, source)
        todo = [row for row in rows if row not in covered]
        chunks = [todo[i:i + self.shard_samples] for i in range(0, len(todo), self.shard_samples)]
        for chunk in tqdm(chunks, desc="index", unit="shard", disable=not self.progress or len(chunks) < 2):
            self._write(source, samples, chunk)

    def _write(self, source: int, samples: Sequence[dict], rows: list[int]) -> None:
        failures: list[SampleError] = []
        # position: (hidden, errors, gram, energy kept, the label states before merging)
        stored: dict[int, tuple] = {}
        for batch in self.valuator.each_label_states(subset_of(samples, rows), failures):
            encoded = encode(batch, self.valuator.math, self.sketch)
            for states, hidden, errors, gram in zip(batch, *split(encoded), strict=True):
                merged = (hidden, errors, gram, 1.0) if self.max_tokens is None else \
                    merge_tokens(hidden, errors, gram, self.max_tokens)
                stored[states.index] = (*merged, hidden)
        kept = sorted(stored)
        number = len(self.manifest["shards"])
        entry = {"file": None, "source": source, "rows": [rows[0], rows[-1] + 1],
                 "samples": len(kept), "tokens": sum(len(stored[i][0]) for i in kept)}
        if kept:
            entry["file"] = f"shard-{number:05d}.safetensors"
            ids = [sample_id_of(samples[rows[i]], default_id(source, rows[i])) for i in kept]
            metas = [sample_metadata(samples[rows[i]]) for i in kept]
            write_shard(self.folder / entry["file"], self._tensors(stored, kept, rows), ids, metas)
        self.manifest["failed"].extend({"source": source, "row": rows[e.index], "id": e.sample_id,
                                        "error": str(e)} for e in failures)
        self.manifest["shards"].append(entry)
        write_manifest(self.folder, self.manifest)

    def _tensors(self, stored: dict[int, tuple], kept: list[int], rows: list[int]) -> dict[str, torch.Tensor]:
        def column(part: int) -> torch.Tensor:
            return torch.cat([stored[i][part] for i in kept])

        hidden, errors, gram = column(0), column(1), column(2)
        # The pool's moments are of the states before merging (a query's P is the unmerged
        # index's), as stored: without merging, of exactly what the shard holds.
        unmerged = hidden if self.max_tokens is None else column(4)
        tensors = {"hidden": hidden.to(self.storage), "errors": errors.to(self.storage), "gram": gram,
                   "sizes": torch.tensor([len(stored[i][0]) for i in kept]),
                   "rows": torch.tensor([rows[i] for i in kept]),
                   "moment_sum": moment_sum(unmerged.to(self.storage))}
        if self.max_tokens is not None:
            tensors["counts"] = torch.tensor([len(stored[i][4]) for i in kept])
            tensors["energy_kept"] = torch.tensor([stored[i][3] for i in kept], dtype=torch.float32)
        return tensors


def split(encoded: Encoded) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Each sample's (hidden, errors, gram) of an encoded batch."""
    return (encoded.hidden.split(encoded.sizes), encoded.errors.split(encoded.sizes),
            encoded.gram.split([n * n for n in encoded.sizes]))


def samples_of(train: Sequence[dict] | str | Path) -> tuple[Sequence[dict], dict[str, Any]]:
    """The samples and their source entry (a path, or "samples" for a list given in Python)."""
    samples = read_samples(str(train)) if isinstance(train, (str, Path)) else train
    if len(samples) == 0:
        raise ValueError(f"no samples in {train if isinstance(train, (str, Path)) else 'the list given'}")
    path = str(train) if isinstance(train, (str, Path)) else "samples"
    return samples, {"path": path, "fingerprint": sample_fingerprint(samples), "rows": len(samples)}


def read_source(entry: dict[str, Any]) -> Sequence[dict]:
    """The samples of a source entry read again, checked to be what was stored."""
    if entry["path"] == "samples":
        raise ValueError("these samples were given in Python, not read from a file: keep them to "
                         "look up the selected ids")
    samples = read_samples(entry["path"])
    if sample_fingerprint(samples) != entry["fingerprint"]:
        raise IndexMismatch(f"{entry['path']} changed since it was indexed: its stored values no "
                            f"longer describe it (rebuild the index, or restore the file)")
    return samples
