"""The index's costs on this machine, measured side by side in one run:

- **build** against ``forvalue score`` with the same options (select's default: A from the
  target, cosine, the skip readout) on the same pool: the one pass an index costs against the
  pass every target costs without one;
- **select** for a new target from a stored pool of ``--tile`` samples (the built shards copied
  under new ids, so the states and sketches are real ones): the target's forward pass, then the
  scan, warm page cache, and the scan's rate per stored sample;
- **query**: the top 10 stored samples for one sample over the same pool.

    python -m forvalue.bench.perf.index_speed --copies 2 --tile 20000 --out bench/results/index/speed.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

from forvalue.bench.common import load_average, machine
from forvalue.bindings.cli.demo import make_task
from forvalue.engine import Index, ValuationConfig, Valuator, load_model
from forvalue.engine.index.store import read_manifest, write_manifest, write_shard


def demo_pool(copies: int) -> tuple[list[dict], list[dict]]:
    """The demo task's training chats ``copies`` times (new ids), and its validation chats."""
    task = make_task(0)
    train = [{**s, "id": f"{s['id']}/{c}"} for c in range(copies) for s in task.train]
    return train, task.valid


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=2, help="copies of the demo pool to build from")
    parser.add_argument("--tile", type=int, default=20000, help="stored samples to select from")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    config = ValuationConfig.for_command("select")
    train, valid = demo_pool(args.copies)
    command = f"python -m forvalue.bench.perf.index_speed --copies {args.copies} --tile {args.tile}"
    result = {"machine": machine(), "command": command, "pool": len(train), "valid": len(valid)}
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "index"
        valuator = Valuator(model, config=config, progress=False)
        _, result["score_seconds"] = timed(lambda: valuator.score(train, valuator.reference(valid)))
        index, result["build_seconds"] = timed(Index.build, train, folder, model=model, config=config,
                                               progress=False)
        _, result["score_seconds_again"] = timed(lambda: valuator.score(train, valuator.reference(valid)))
        result["build_over_score"] = result["build_seconds"] / min(result["score_seconds"],
                                                                   result["score_seconds_again"])
        result["bytes_per_sample"] = index.info()["bytes_per_sample"]
        tile(folder, args.tile)
        index = Index.open(folder, model, config, progress=False)
        result["stored"] = index.samples
        result["stored_bytes"] = index.info()["bytes"]
        index.values(valid)  # warm the page cache
        (target, _), result["target_seconds"] = timed(index.prepare_target, valid, "mean", False)
        _, result["scan_seconds"] = timed(index.scan, [target])
        result["scan_us_per_sample"] = 1e6 * result["scan_seconds"] / index.samples
        result["scan_seconds_at_1m_extrapolated"] = result["scan_seconds"] * 1e6 / index.samples
        _, result["query_top10_seconds"] = timed(index.query, valid[:1], top=10)
    result["load_average_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
