"""``forvalue score --ray`` and ``forvalue select --ray``: the batch job on Ray Data.

The same files as the local job (``bindings/jobs/batch.py``): ``--out`` gets one ``{"id", "index",
"value"}`` line per sample and ``OUT.errors.jsonl`` one per failed sample, appended (fsynced)
as batches come back, so an interrupted run resumes from what is there. Ray returns batches in
completion order; when every sample is in, both files are rewritten in input order.
``--out-format parquet`` makes ``--out`` a folder: the same two logs inside it (``values.jsonl``,
``values.errors.jsonl``), and, at the end, the values in input order as ``part-NNNNN.parquet``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from forvalue.engine import Reference

from ..jobs.job_record import claim_batch_output
from ..jobs.result_log import ResultLog, write_jsonl_atomic
from ..jobs.shards import JobFiles
from ..ray_jobs.pool import (
    build_covariance,
    build_reference,
    check_columns,
    first_line,
    init_ray,
    read_dataset,
    score_dataset,
    with_index,
)
from .options import config_from_args, covariance_from_args, model_options
from .report import print_summary

PARQUET_ROWS = 1_000_000  # rows per parquet file of --out-format parquet


def add_ray_arguments(parser: argparse.ArgumentParser, *, out_format: bool = True) -> None:
    """``--ray`` and its options (flags of the job, not valuation options); ``--out-format``
    for the commands that write values."""
    group = parser.add_argument_group("Ray (pip install 'forvalue[ray]')")
    group.add_argument("--ray", action="store_true",
                       help="value on Ray Data: a pool of actors, one resident model each")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (default: start a local Ray on this machine's CPUs)")
    group.add_argument("--actors", type=int, default=2, help="actors in the pool (default: 2)")
    group.add_argument("--gpus-per-actor", type=float, default=0.0,
                       help="GPUs each actor reserves (default: 0, CPU)")
    if out_format:
        group.add_argument("--out-format", choices=("jsonl", "parquet"), default="jsonl",
                           help="jsonl: --out is one file; parquet: --out is a folder (default: jsonl)")


def check_ray_arguments(args: argparse.Namespace, mode: str) -> None:
    """Options the Ray job does not take, refused before anything starts."""
    if mode not in ("reference", "self"):
        raise ValueError(f"--ray values --mode reference or self; run --mode {mode} without --ray "
                         "(split it with --shard I/N)")
    if getattr(args, "shard", None) is not None:
        raise ValueError("--shard splits a local job; --ray spreads one job over the cluster")
    if getattr(args, "top_k", None) is not None:
        raise ValueError("--top-k ranks a pairwise job, which runs without --ray")


def run_ray_job(args: argparse.Namespace, command: str, mode: str, out: Path,
                fields: dict[str, str]) -> dict[str, Any] | None:
    """Value ``args.train`` on Ray into ``out``; returns the summary, or None when Ray failed
    (reported in one line: rerun the same command to resume)."""
    check_ray_arguments(args, mode)
    config = config_from_args(args, command)
    covariance = _covariance_path(args, config)
    files = JobFiles(out / "values.jsonl" if args.out_format == "parquet" else out)
    files.out.parent.mkdir(parents=True, exist_ok=True)
    claim_batch_output(args, command, mode, config, files, fields)
    ray = init_ray(args.ray_address)
    options = model_options(args)
    try:
        reference = None
        if mode == "reference":
            reference = ray.put(_reference(args, config, covariance, files, fields, options))
        source = read_dataset(args.train, split=args.split)
        check_columns(source, fields)
        with ResultLog(files.out) as log:
            source, total = with_index(source, log.done("index"), block_rows=args.checkpoint)
            if len(log.done("index")) == total:  # a rerun of a finished job
                return _finish(files, out, args.out_format, mode, total)
            results = score_dataset(source, model=args.model, reference=reference, config=config,
                                    covariance=covariance, fields=fields, mode=mode, actors=args.actors,
                                    gpus_per_actor=args.gpus_per_actor, batch_size=args.checkpoint,
                                    model_options=options)
            _collect(results, log, total)
    except _ray_errors(ray) as error:
        print(f"forvalue: error: the Ray job failed: {first_line(error)}; rerun the same command to "
              "resume", file=sys.stderr)
        return None
    return _finish(files, out, args.out_format, mode, total)


def run_ray_covariance(args: argparse.Namespace) -> tuple[Any, int] | None:
    """``forvalue covariance --ray``: the covariance summed on the pool (None when Ray failed,
    reported in one line)."""
    ray = init_ray(args.ray_address)
    options = model_options(args)
    try:
        return build_covariance(read_dataset(args.train), model=args.model,
                                config=config_from_args(args, "covariance"), actors=args.actors,
                                gpus_per_actor=args.gpus_per_actor, model_options=options)
    except _ray_errors(ray) as error:
        print(f"forvalue: error: the Ray job failed: {first_line(error)}", file=sys.stderr)
        return None


def run_ray_index_build(args: argparse.Namespace, config: Any, build_options: dict[str, Any]) -> Path | None:
    """``forvalue index build --ray``: ``--actors`` parts built as Ray tasks, then merged (None
    when Ray failed, reported in one line; a rerun resumes the parts)."""
    from ..ray_jobs.index_build import build_index

    if args.shard != "0/1":
        raise ValueError("--ray builds every part itself: leave out --shard")
    ray = init_ray(args.ray_address)
    options = model_options(args)
    try:
        return build_index(args.train, args.out, model=args.model, config=config, parts=args.actors,
                           model_options=options, gpus_per_part=args.gpus_per_actor,
                           address=args.ray_address, overwrite=args.overwrite, **build_options)
    except _ray_errors(ray) as error:
        print(f"forvalue: error: the Ray job failed: {first_line(error)}; rerun the same command to "
              "resume", file=sys.stderr)
        return None


def _covariance_path(args: argparse.Namespace, config: Any) -> str | None:
    """``--covariance FILE`` as a path every worker opens (checked here first)."""
    if args.covariance == "valid":
        return None
    covariance_from_args(args, config)  # a bad file is one error line now, not one per worker
    return str(Path(args.covariance).resolve())


def _reference(args: argparse.Namespace, config: Any, covariance: str | None, files: JobFiles,
               fields: dict[str, str], options: dict[str, Any]) -> Reference:
    """A saved reference, the one this job built before, or one built on the pool now (kept
    beside ``--out`` like the local job's)."""
    if args.valid is None:
        raise ValueError("--mode reference needs --valid")
    if args.valid.endswith(".safetensors"):
        return Reference.load(args.valid)
    if files.reference.exists():
        return Reference.load(files.reference)
    reference, skipped = build_reference(read_dataset(args.valid), model=args.model, config=config,
                                         covariance=covariance, fields=fields, actors=args.actors,
                                         gpus_per_actor=args.gpus_per_actor, model_options=options)
    if skipped:
        print(f"forvalue: skipped {skipped} validation samples", file=sys.stderr)
    reference.save(files.reference)
    return reference


def _collect(results: Any, log: ResultLog, total: int) -> None:
    """Append each batch's records as it comes back (fsynced)."""
    done = len(log.results) + len(log.errors)
    with tqdm(total=total, initial=done, desc="ray values", unit="sample") as bar:
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            log.add([{"id": r["id"], "index": r["index"], "error": r["error"]} for r in rows if r["error"]],
                    failed=True)
            log.add([{"id": r["id"], "index": r["index"], "value": r["value"]} for r in rows
                     if not r["error"]], failed=False)
            log.sync()
            bar.update(len(rows))


def _finish(files: JobFiles, out: Path, out_format: str, mode: str, total: int) -> dict[str, Any]:
    """Both logs rewritten in input order; the parquet folder when asked."""
    with ResultLog(files.out) as log:
        results = sorted(log.results, key=lambda r: r["index"])
        errors = sorted(log.errors, key=lambda r: r["index"])
    write_jsonl_atomic(files.out, results)
    write_jsonl_atomic(files.errors, errors)
    summary = {"mode": mode, "scored": len(results), "errors": len(errors), "samples": total,
               "out": str(out), "errors_file": str(files.errors)}
    if out_format == "parquet":
        summary["parquet_files"] = _write_parquet(out, results)
    return summary


def _write_parquet(folder: Path, records: list[dict[str, Any]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for old in folder.glob("part-*.parquet"):
        old.unlink()
    parts = max(1, math.ceil(len(records) / PARQUET_ROWS))
    for number in range(parts):
        chunk = records[number * PARQUET_ROWS:(number + 1) * PARQUET_ROWS]
        schema = pa.schema([("id", pa.string()), ("index", pa.int64()), ("value", pa.float64())])
        table = pa.table({key: [r[key] for r in chunk] for key in schema.names}, schema=schema)
        pq.write_table(table, folder / f"part-{number:05d}.parquet")
    return parts


def _ray_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """What a failed Ray job raises: a dead actor past its retries, out of memory, lost
    objects (RayError), or an error in the workers' code as Ray Data wraps it."""
    from ray.data.exceptions import UserCodeException

    return (ray.exceptions.RayError, UserCodeException)


def print_ray_summary(summary: dict[str, Any] | None) -> int:
    """The exit status of a Ray job (1: Ray failed, rerun to resume)."""
    if summary is None:
        return 1
    print_summary(summary)
    return 0
