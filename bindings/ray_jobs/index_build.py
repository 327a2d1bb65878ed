"""``forvalue index build --ray``: the pool stored in parts on Ray, one task per part, joined.

Each task loads its own model and builds the ``i``-th of ``n`` contiguous parts of the pool
(``Index.build(..., shard=(i, n))``) into ``OUT.parts/part-i``; the driver then merges the parts
into ``OUT`` (``Index.merge``) and removes them. A part resumes like any build, so a rerun after
a failure values only what no part stored; a merge cut short is done again. The parts are
written where their task runs: on a cluster, ``OUT`` must be on storage every node sees.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from forvalue.engine import Index, load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.index.store import MANIFEST, IndexMismatch

from .pool import RETRIES, init_ray


def build_index(train: str, out: Path, *, model: str, config: ValuationConfig, parts: int,
                model_options: dict[str, Any] | None = None, gpus_per_part: float = 0.0,
                address: str | None = None, overwrite: bool = False, **build_options: Any) -> Path:
    """Build the index of ``train`` into ``out`` as ``parts`` Ray tasks, then merge them;
    ``build_options``: those of ``Index.build`` (sketch_rows, seed, storage, shard_samples)."""
    if parts < 1:
        raise ValueError(f"--actors must be at least 1, got {parts}")
    if (out / MANIFEST).exists():
        if not overwrite:
            raise IndexMismatch(f"{out} already holds an index: pass --overwrite to replace it")
        shutil.rmtree(out)
    ray = init_ray(address)
    folder = out.with_name(out.name + ".parts")
    task = ray.remote(num_gpus=gpus_per_part, max_retries=RETRIES)(_build_part)
    futures = [task.remote(str(Path(train).absolute()), str(folder.absolute() / f"part-{i}"), (i, parts),
                           model, model_options or {}, config, build_options) for i in range(parts)]
    built = [Path(path) for path in ray.get(futures)]
    if out.exists():
        shutil.rmtree(out)  # a merge cut short: its shards are copied again
    Index.merge(built, out)
    shutil.rmtree(folder)
    return out


def _build_part(train: str, folder: str, shard: tuple[int, int], model: str, model_options: dict[str, Any],
                config: ValuationConfig, build_options: dict[str, Any]) -> str:
    Index.build(train, folder, model=load_model(model, **model_options), config=config, shard=shard,
                progress=False, **build_options)
    return folder
