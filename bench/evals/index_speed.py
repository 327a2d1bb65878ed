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
  one index build and one scan for all, against 10 exact ``select`` valuations;
- **million** (``--parts million --pool-index IDX``, an index of distinct samples of
  ``--pool-task`` built apart): on its real samples, what select's fast routes keep of the
  exact choice and the query recall with and without inverted lists; cold reads (files
  dropped from the page cache); then the coarse vectors tiled to ``--million``: select on the
  estimates and shortlisted queries, each timed after its target's forward pass.

    python -m forvalue.bench.evals.index_speed --tile 20000 --out bench/results/index/speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

from forvalue.bench.common import load_average, machine
from forvalue.engine import Index, ValuationConfig, Valuator, load_model
from forvalue.engine.index import coarse, lists
from forvalue.engine.index.store import read_manifest, write_manifest, write_shard

from .tasks import make_task

PARTS = ("build", "recall", "scale", "targets", "million")
RATIO = 0.05  # select's budget at scale


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
    original = coarse.CANDIDATES
    coarse.CANDIDATES = max(1, int(share * index.samples))
    try:
        found = index.query(queries, top=top)
    finally:
        coarse.CANDIDATES = original
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


def real_pool(index: Index, valid: list[dict], queries: list[dict], top: int = 10) -> dict:
    """On the index's own (distinct) samples: select's routes against the exact scan (the share
    of exact select's choice each keeps), and query recall without and with inverted lists."""
    out = {"stored": index.samples}
    exact, out["select_exact_seconds"] = timed(index.select, valid, RATIO)
    _, out["coarse_vectors_seconds"] = timed(index._search.vectors)
    for m in (0, 1, 3):
        found, seconds = timed(index.select, valid, RATIO, shortlist=m)
        out[f"select_shortlist_{m}"] = {"seconds": seconds, "kept": len(set(exact) & set(found)) / len(exact)}
    truth, out["query_exact_seconds"] = timed(index.query, queries, top=index.samples, exact=True)
    out["query_recall_full_read"] = recall(index.query(queries, top=top), truth, top)
    vectors = index._search.vectors()
    vectors.lists, out["lists_seconds"] = timed(lists.build, vectors.vectors, vectors.norms, 0)
    out["lists"] = vectors.lists.count
    out["query_recall_lists"] = recall(index.query(queries, top=top), truth, top)
    vectors.lists = None
    return out


def drop_from_page_cache(folder: Path) -> None:
    """Ask the kernel to drop the index's files from the page cache (``POSIX_FADV_DONTNEED``
    needs no privileges; clean pages go), so that the next reads come from the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cold(folder: Path, model, config, valid: list[dict], queries: list[dict]) -> dict:
    """A freshly opened index whose files are dropped from the page cache after its target's
    forward pass: select (every stored token, and the estimates alone) and one query."""
    out = {}
    for name, call in (("select_exact", lambda index: index.select(valid, RATIO)),
                       ("select_shortlist_0", lambda index: index.select(valid, RATIO, shortlist=0)),
                       ("query", lambda index: index.query(queries[:1], top=10))):
        index = Index.open(folder, model, config, progress=False)
        target = (index.prepare_target(queries[:1], "each", True) if name == "query"
                  else index.prepare_target(valid, "mean", False))
        index.prepare_target = lambda *args, target=target, **kwargs: target
        drop_from_page_cache(folder)
        _, out[f"{name}_seconds_after_the_target"] = timed(call, index)
    return out


def tie_aware_recall(found: list[dict], truth: list[dict], copies: int, top: int) -> float:
    """Recall against a pool of ``copies`` copies of each sample: a found sample counts when its
    exact value is at least the exact ``top``-th of the tiled pool (the copies tie)."""
    shares = []
    for f, t in zip(found, truth, strict=True):
        for side, sign in (("most", 1), ("least", -1)):
            exact = {n["id"]: sign * n["value"] for n in t["most"]}
            tiled = np.sort(np.repeat(list(exact.values()), copies))[::-1]
            shares.append(np.mean([exact[n["id"]] >= tiled[top - 1] - 1e-12 for n in f[side]]))
    return float(np.mean(shares))


def after_the_target(index: Index, samples: list[dict], columns: str, from_pool: bool, call) -> tuple:
    """``call()``'s result and seconds with the target's forward pass done beforehand (the
    index's ``prepare_target`` answers from it), and that forward pass's seconds."""
    prepared, forward = timed(index.prepare_target, samples, columns, from_pool)
    index.prepare_target = lambda *args, **kwargs: prepared
    try:
        result, seconds = timed(call)
    finally:
        del index.prepare_target
    return result, seconds, forward


def at_million(index: Index, valid: list[dict], queries: list[dict], samples: int, top: int = 10) -> dict:
    """The index's coarse vectors tiled to ``samples`` (real vectors repeated; the copies point
    at the real stored tokens), warm: select's fast routes and shortlisted queries, each timed
    after its target's forward pass."""
    vectors = index._search.vectors()
    copies = -(-samples // len(vectors.vectors))
    tiled = coarse.CoarseVectors(*(part.repeat(copies, *[1] * (part.dim() - 1))[:samples]
                                   for part in (vectors.vectors, vectors.norms, vectors.places)))
    out = {"tiled": samples, "copies": copies, "coarse_bytes": tiled.vectors.numel() * 2}
    tiled.lists, out["lists_seconds"] = timed(lists.build, tiled.vectors, tiled.norms, 0)
    index._search._held.vectors = tiled
    for m in (0, 1):
        found, seconds, forward = after_the_target(index, valid, "mean", False,
                                                   lambda m=m: index.select(valid, RATIO, shortlist=m))
        out[f"select_shortlist_{m}"] = {"seconds_after_the_target": seconds, "selected": len(found),
                                        "target_seconds": forward}
    truth = index.query(queries, top=len(vectors.vectors), exact=True)
    answers, seconds = [], []
    for query in queries:
        (answer, *_), after, _ = after_the_target(index, [query], "each", True,
                                                  lambda query=query: index.query([query], top=top))
        answers.append(answer)
        seconds.append(after)
    out["query_seconds_after_the_target"] = {"median": float(np.median(seconds)), "max": float(max(seconds)),
                                             "all": seconds}
    out["query_tie_aware_recall"] = tie_aware_recall(answers, truth, copies, top)
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
    parser.add_argument("--parts", default=",".join(PARTS[:4]), help=f"which measurements, of {PARTS}")
    parser.add_argument("--pool-index", type=Path,
                        help="million: an index of >= 10k distinct samples of --pool-task (built apart)")
    parser.add_argument("--pool-task", default="mislabeled",
                        help="million: the task whose validation set is the target")
    parser.add_argument("--million", type=int, default=1_000_000, help="million: stored samples, tiled")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    parts = args.parts.split(",")
    model = load_model("smollm2-135m")
    config = ValuationConfig.for_command("select")
    if "million" in parts:
        if args.pool_index is None:
            parser.error("--parts million needs --pool-index")
        pool_task = make_task(args.pool_task, "full", 0)
        index = Index.open(args.pool_index, model, config, progress=False)
        queries = pool_task.valid[:20]
        command = (f"python -m forvalue.bench.evals.index_speed --parts million --pool-index IDX "
                   f"--pool-task {args.pool_task} --million {args.million}")
        result = {"machine": machine(), "command": command,
                  "pool_index": index.info(), "real": real_pool(index, pool_task.valid, queries),
                  "cold": cold(args.pool_index, model, config, pool_task.valid, queries),
                  "million": at_million(index, pool_task.valid, queries, args.million)}
        return finish(result, args.out)
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
    finish(result, args.out)


def finish(result: dict, out: Path) -> None:
    result["load_average_after"] = load_average()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
