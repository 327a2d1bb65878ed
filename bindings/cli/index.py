"""``forvalue index``: build a pool's index once, then select and query from it for any target
(engine/index/). Subcommands: build, append, info, select, query, delete, compact, merge."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from forvalue.engine.config import INDEX_BUILD, INDEX_QUERY

from ..jobs.batch import STRATEGIES, select_top
from ..jobs.result_log import write_jsonl_atomic
from ..jobs.shards import Shard
from .options import add_model_arguments, add_valuation_arguments, config_from_args, load_model_from_args
from .ray_job import add_ray_arguments, run_ray_index_build
from .report import print_summary


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands of ``forvalue index`` and their options."""
    parser.description = ("Store a training pool's label states and sketched errors once (one forward "
                          "pass), then value it against any validation set or sample from the store.")
    commands = parser.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND",
                                     parser_class=argparse.ArgumentParser)
    build = commands.add_parser("build", help="value the pool once into an index folder (resumable)")
    build.add_argument("--train", required=True,
                       help="training samples: .jsonl, .parquet or a datasets folder")
    build.add_argument("--out", type=Path, required=True, help="the index folder")
    build.add_argument("--sketch-rows", type=int, default=None, metavar="K",
                       help="rows of the vocabulary sketch (default 1024; 0: none, every error whole)")
    build.add_argument("--seed", type=int, default=0, help="the sketch's seed")
    build.add_argument("--storage", choices=("bfloat16", "float32"), default="bfloat16",
                       help="dtype of the stored states and errors")
    build.add_argument("--max-tokens", type=int, default=None, metavar="N",
                       help="store a sample of more label tokens merged to N (its N directions of "
                            "largest error energy: bounds the bytes per sample; default: all kept)")
    build.add_argument("--shard", default="0/1", metavar="I/N", help="store only part I of N of the pool "
                       "(join the parts with `forvalue index merge`)")
    build.add_argument("--shard-samples", type=int, default=None, help="samples per shard file")
    build.add_argument("--overwrite", action="store_true", help="replace an index built otherwise in --out")
    _model_and_options(build, INDEX_BUILD)
    add_ray_arguments(build, out_format=False)
    append = commands.add_parser("append", help="store more samples in an index (resumable)")
    append.add_argument("index", type=Path)
    append.add_argument("--train", required=True, help="the new samples")
    add_model_arguments(append)
    info = commands.add_parser("info", help="what an index holds")
    info.add_argument("index", type=Path)
    select = commands.add_parser("select", help="keep the most valuable stored samples for a target")
    select.add_argument("index", type=Path)
    select.add_argument("--valid", action="append", required=True,
                        help="validation samples (repeat with --out for several targets: one scan)")
    select.add_argument("--out", type=Path, action="append", required=True,
                        help="JSONL of the selected samples, one per --valid; values in OUT.values.jsonl")
    select.add_argument("--ratio", type=float, required=True, help="share of samples to keep, in (0, 1]")
    select.add_argument("--strategy", choices=STRATEGIES, default="top",
                        help="as in `forvalue select`: the top values, or round-robin over the "
                             "validation samples")
    select.add_argument("--shortlist", type=float, default=None, metavar="M",
                        help="value exactly only the M x budget samples of highest coarse estimate and "
                             "choose among them; 0: choose on the estimates alone, the fastest (their "
                             "cosine norms are the pool's); default: every stored sample exactly")
    _where_argument(select)
    _model_and_options(select, INDEX_QUERY)
    query = commands.add_parser("query", help="each sample's most and least valuable stored samples")
    query.add_argument("index", type=Path)
    query.add_argument("--samples", required=True, help="the samples to explain")
    query.add_argument("--top", type=int, default=10, help="stored samples per side (default 10)")
    query.add_argument("--exact", action="store_true",
                       help="value every stored sample (by default a large pool is first shortlisted "
                            "by coarse vectors)")
    query.add_argument("--out", type=Path, required=True, help="JSONL: {id, most, least} per sample")
    _where_argument(query)
    _model_and_options(query, INDEX_QUERY)
    delete = commands.add_parser("delete", help="forget samples by id (compact frees their bytes)")
    delete.add_argument("index", type=Path)
    delete.add_argument("--ids", nargs="+", required=True, help="ids, or @FILE of one id per line")
    compact = commands.add_parser("compact", help="rewrite the shards without deleted samples")
    compact.add_argument("index", type=Path)
    merge = commands.add_parser("merge", help="join indexes built alike (the parts of --shard builds)")
    merge.add_argument("indexes", type=Path, nargs="+")
    merge.add_argument("--out", type=Path, required=True, help="the new index folder")


def _where_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only the stored samples whose \"meta\" has KEY equal to VALUE (repeat: "
                             "every key must match, a key given twice takes either value); each "
                             "of them is valued exactly")


def run_index(args: argparse.Namespace) -> int:
    """``forvalue index SUBCOMMAND``; returns the exit status."""
    return {"build": _build, "append": _append, "info": _info, "select": _select, "query": _query,
            "delete": _delete, "compact": _compact, "merge": _merge}[args.index_command](args)


def _model_and_options(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_arguments(parser)
    add_valuation_arguments(parser, command)


def _model(args: argparse.Namespace) -> Any:
    return load_model_from_args(args)


def _open(args: argparse.Namespace, *, with_model: bool, command: str | None = None) -> Any:
    from forvalue.engine import Index

    config = None if command is None else _query_config(args, command)
    return Index.open(args.index, _model(args) if with_model else None, config, progress=True)


def _query_config(args: argparse.Namespace, command: str) -> Any:
    """The query's options, with the index's labelling (which the query flags do not show)."""
    from forvalue.engine.index.store import read_manifest

    return config_from_args(args, command).replace(**read_manifest(args.index)["labelling"])


def _build(args: argparse.Namespace) -> int:
    from forvalue.engine import Index
    from forvalue.engine.index.layout import SKETCH_ROWS
    from forvalue.engine.index.writer import SHARD_SAMPLES, check_build_options

    shard = Shard.parse(args.shard)
    config = config_from_args(args, INDEX_BUILD)
    options = {"sketch_rows": SKETCH_ROWS if args.sketch_rows is None else args.sketch_rows,
               "seed": args.seed, "storage": args.storage, "max_tokens": args.max_tokens,
               "shard_samples": SHARD_SAMPLES if args.shard_samples is None else args.shard_samples}
    check_build_options(args.storage, options["sketch_rows"], args.max_tokens)
    if args.ray:
        if run_ray_index_build(args, config, options) is None:
            return 1
        index = Index.open(args.out)
    else:
        index = Index.build(args.train, args.out, model=_model(args), config=config,
                            shard=(shard.index, shard.count), overwrite=args.overwrite, **options)
    print_summary(_brief(index.info()))
    return 0


def _append(args: argparse.Namespace) -> int:
    index = _open(args, with_model=True)
    print_summary({"appended": index.append(args.train), **_brief(index.info())})
    return 0


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(_open(args, with_model=False).info(), indent=1))
    return 0


def _select(args: argparse.Namespace) -> int:
    if not 0 < args.ratio <= 1:
        raise ValueError(f"--ratio must lie in (0, 1], got {args.ratio}")
    if len(args.valid) != len(args.out):
        raise ValueError(f"give one --out per --valid ({len(args.valid)} --valid, {len(args.out)} --out)")
    if args.shortlist is not None and not args.shortlist >= 0:
        raise ValueError(f"--shortlist must be >= 0 (a multiple of the budget), got {args.shortlist}")
    from forvalue.engine.index.metadata import parse_where
    from forvalue.engine.inputs.readers import read_samples

    where = parse_where(args.where)
    index = _open(args, with_model=True, command=INDEX_QUERY)
    # The pool is read (and checked unchanged) before the scan, not after it.
    sources = [index.source_samples(i) for i in range(len(index.manifest["sources"]))]
    columns = "mean" if args.strategy == "top" else "each"
    targets = [read_samples(v) for v in args.valid]
    if args.shortlist is None:
        found = index.values_many(targets, columns=columns, where=where)
    else:  # one share for all targets: the widest a target's groups need (Index.select's rule)
        groups = 1 if columns == "mean" else min(len(t) for t in targets)
        found = index.values_many(targets, columns=columns,
                                  shortlist=min(1.0, args.shortlist * args.ratio / groups), where=where)
    offsets = [sum(len(s) for s in sources[:i]) for i in range(len(sources))]
    pool = [sample for samples in sources for sample in samples]
    for valid, out, values in zip(args.valid, args.out, found, strict=True):
        records = _records(values, _positions(values, offsets), columns)
        write_jsonl_atomic(out.with_name(out.stem + ".values.jsonl"), records)
        exact = [records[i] for i in values.exact_rows()]
        summary = select_top(pool, exact, args.ratio, out, args.strategy, pool_size=len(records))
        print_summary({"valid": valid, **summary, "estimated": len(records) - len(exact),
                       "valid_skipped": len(values.errors)})
    return 0


def _records(values: Any, positions: list[int], columns: str) -> list[dict[str, Any]]:
    """The values file's records; a coarse estimate is marked ``"estimated": true``."""
    key = "value" if columns == "mean" else "values"
    estimated = [False] * len(positions) if values.estimated is None else values.estimated
    return [{"id": i, "index": p, key: row[0] if columns == "mean" else row.tolist(),
             **({"estimated": True} if guess else {})}
            for i, p, row, guess in zip(values.ids, positions, values.values, estimated, strict=True)]


def _positions(values: Any, offsets: list[int]) -> list[int]:
    """Each stored sample's position in the sources read one after another."""
    return [offsets[s] + int(r) for s, r in zip(values.sources, values.rows, strict=True)]


def _query(args: argparse.Namespace) -> int:
    from forvalue.engine.index.metadata import parse_where
    from forvalue.engine.inputs.readers import read_samples
    from forvalue.engine.inputs.samples import sample_id_of

    if args.top < 1:
        raise ValueError(f"--top must be positive, got {args.top}")
    where = parse_where(args.where)
    samples = read_samples(args.samples)
    index = _open(args, with_model=True, command=INDEX_QUERY)
    answers = index.query(samples, top=args.top, exact=args.exact, where=where)
    lines = [{"id": sample_id_of(samples[a["position"]], str(a["position"])),
              **{k: v for k, v in a.items() if k != "position"}} for a in answers]
    write_jsonl_atomic(args.out, lines)
    failed = sum("error" in line for line in lines)
    print_summary({"queries": len(lines), "failed": failed, "out": str(args.out)})
    return 0


def _delete(args: argparse.Namespace) -> int:
    ids = args.ids
    if len(ids) == 1 and ids[0].startswith("@"):
        lines = Path(ids[0][1:]).read_text(encoding="utf-8").splitlines()
        ids = [line.strip() for line in lines if line.strip()]
    index = _open(args, with_model=False)
    print_summary({"deleted": index.delete(ids), "samples": index.samples})
    return 0


def _compact(args: argparse.Namespace) -> int:
    index = _open(args, with_model=False)
    print_summary({"bytes_freed": index.compact(), **_brief(index.info())})
    return 0


def _merge(args: argparse.Namespace) -> int:
    from forvalue.engine import Index

    print_summary(_brief(Index.merge(args.indexes, args.out).info()))
    return 0


def _brief(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("folder", "samples", "deleted", "failed", "shards", "bytes", "bytes_per_sample")
    merging = ("merged_samples", "least_energy_kept")  # an index with max_tokens only
    return {key: info[key] for key in keys} | {key: info[key] for key in merging if key in info}

