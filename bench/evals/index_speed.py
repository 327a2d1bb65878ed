"""The index's costs on this machine, measured side by side in one run, on the selection task
(``forvalue eval``'s, full size: 400 distinct training chats, 40 validation chats; here, beside
the task generator, rather than in perf/, because it needs distinct samples for its recall):

- **build** against ``forvalue score`` with the same options (select's default: A from the
  target, cosine, the skip readout) on the same pool;
- **recall@10** of a shortlisted query (coarse vectors, then the shortlist valued exactly)
  against the exact query, with shortlists of 5% of the pool per side;
- **select and query at scale**: the built shards copied under new ids until the index holds
  ``--tile`` samples (real states and sketches, repeated), warm page cache: the target's
  forward pass, one full scan, building the coarse vectors, a shortlisted top-10 query;
- **10 targets** (the validation chats in 10 groups) on ``--targets-pool`` training chats:
  one index build and one scan for all, against 10 exact ``select`` valuations.

    python -m forvalue.bench.evals.index_speed --tile 20000 --out bench/results/index/speed.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

from forvalue.bench.common import load_average, machine
from forvalue.engine import Index, ValuationConfig, Valuator, load_model
from forvalue.engine.index import coarse
from forvalue.engine.index.store import read_manifest, write_manifest, write_shard

from .tasks import make_task

PARTS = ("build", "recall", "scale", "targets")


def tile(folder: Path, samples: int) -> None:
    """Copy the index's shards under new ids until it holds ``samples`` samples."""
    manifest = read_manifest(folder)
    originals = [e for e in manifest["shards"] if e["file"]]
    copy = 0
    while sum(e["samples"] for e in manifest["shards"]) < samples:
        copy += 1
        for entry in originals:
            with safe_open(str(folder / entry["file"]), framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                ids = [f"{i}#{copy}" for i in json.loads(f.metadata()["ids"])]
            name = f"tile-{copy:05d}-{entry['file']}"
            write_shard(folder / name, tensors, ids)
            manifest["shards"].append({**entry, "file": name})
    write_manifest(folder, manifest)


def timed(function, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def recall(found: list[dict], exact: list[dict], top: int) -> float:
    """Mean share of the exact top (and bottom) ``top`` ids that the answers found."""
    shares = [len({n["id"] for n in f[side]} & {n["id"] for n in e[side][:top]}) / top
              for f, e in zip(found, exact, strict=True) for side in ("most", "least")]
    return float(np.mean(shares))


def build_against_score(model, config, train, valid, folder: Path) -> dict:
    valuator = Valuator(model, config=config, progress=False)
    _, score_seconds = timed(lambda: valuator.score(train, valuator.reference(valid)))
    index, build_seconds = timed(Index.build, train, folder, model=model, config=config, progress=False)
    _, again = timed(lambda: valuator.score(train, valuator.reference(valid)))
    return {"score_seconds": [score_seconds, again], "build_seconds": build_seconds,
            "build_over_score": build_seconds / min(score_seconds, again),
            "bytes_per_sample": index.info()["bytes_per_sample"]}


def shortlist_recall(index: Index, queries: list[dict], share: float, top: int = 10) -> dict:
    exact = index.query(queries, top=index.samples, exact=True)
    original = coarse.SHORTLIST
    coarse.SHORTLIST = max(1, int(share * index.samples))
    try:
        found = index.query(queries, top=top)
    finally:
        coarse.SHORTLIST = original
    return {"pool": index.samples, "queries": len(queries), "shortlist_per_side": int(share * index.samples),
            "recall_at_10": recall(found, exact, top)}


def at_scale(folder: Path, model, config, valid: list[dict], samples: int) -> dict:
    tile(folder, samples)
    index = Index.open(folder, model, config, progress=False)
    out = {"stored": index.samples, "bytes_on_disk": index.info()["bytes"]}
    index.values(valid[:4])  # warm the page cache
    (target, _), out["target_seconds"] = timed(index.prepare_target, valid, "mean", False)
    _, out["scan_seconds"] = timed(index.scan, [target])
    out["scan_seconds_per_1m_extrapolated"] = out["scan_seconds"] * 1e6 / index.samples
    _, out["first_query_seconds_building_coarse_vectors"] = timed(index.query, valid[:1], top=10)
    _, out["query_seconds"] = timed(index.query, valid[1:2], top=10)
    _, out["query_target_seconds"] = timed(index.prepare_target, valid[1:2], "each", True)
    out["query_seconds_after_the_target"] = out["query_seconds"] - out["query_target_seconds"]
    return out


def ten_targets(model, config, train, valid, folder: Path) -> dict:
    groups = [valid[i::10] for i in range(10)]
    started = time.perf_counter()
    index = Index.build(train, folder, model=model, config=config, progress=False)
    stored = [found.values[:, 0] for found in index.values_many(groups)]
    index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    exact = []
    for group in groups:
        valuator = Valuator(model, config=config, progress=False)
        exact.append(valuator.score(train, valuator.reference(group)))
    exact_seconds = time.perf_counter() - started
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(exact, stored, strict=True)]
    return {"pool": len(train), "targets": 10, "index_seconds": index_seconds, "exact_seconds": exact_seconds,
            "min_corr": min(corr), "mean_corr": float(np.mean(corr))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile", type=int, default=20000, help="stored samples to select from")
    parser.add_argument("--targets-pool", type=int, default=100, help="training chats of the 10-target run")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which measurements, of {PARTS}")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    parts = args.parts.split(",")
    model = load_model("smollm2-135m")
    config = ValuationConfig.for_command("select")
    task = make_task("selection", "full", 0)
    command = (f"python -m forvalue.bench.evals.index_speed --tile {args.tile} "
               f"--targets-pool {args.targets_pool} --parts {args.parts}")
    result = {"machine": machine(), "command": command, "pool": len(task.train), "valid": len(task.valid)}
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "index"
        if "build" in parts:
            result["build"] = build_against_score(model, config, task.train, task.valid, folder)
        else:
            Index.build(task.train, folder, model=model, config=config, progress=False)
        index = Index.open(folder, model, config, progress=False)
        if "recall" in parts:
            result["recall"] = shortlist_recall(index, task.valid, share=0.05)
        if "scale" in parts:
            result["scale"] = at_scale(folder, model, config, task.valid, args.tile)
        if "targets" in parts:
            result["ten_targets"] = ten_targets(model, config, task.train[:args.targets_pool], task.valid,
                                                Path(root) / "ten")
    result["load_average_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
