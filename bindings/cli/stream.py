"""``forvalue stream``: value a samples file on a running server, resumable like the batch jobs.

Results are appended to the same ResultLog files as ``forvalue score`` writes, as they arrive
(fsynced at least every half second), keyed by the samples' ids; a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from forvalue.engine.index.metadata import parse_where
from forvalue.engine.inputs.readers import read_samples
from forvalue.engine.inputs.samples import sample_id_of

from ..client import Client, QueryAnswer, ReferenceInfo, ServerError
from ..client.errors import RETRYABLE
from ..jobs.job_record import claim_output, stream_identity
from ..jobs.result_log import ResultLog, errors_path
from ..jobs.shards import JobFiles
from ..server.auth import read_token
from ..wire import resolve_image_paths
from .report import user_error

SYNC_SECONDS = 0.5


def stream_file(server: str, reference: str | None, input_path: str | os.PathLike, out: str | os.PathLike, *,
                token: str | None = None, tls: bool = False, root_certificates: str | Path | None = None,
                limit: int | None = None, priority: int = 0, retries: int = 3, overwrite: bool = False,
                progress: bool = True, query_top: int | None = None,
                query_where: Sequence[str] = ()) -> dict[str, Any]:
    """Value every sample of ``input_path`` on ``server`` (``host:port``, or replicas as
    ``a:port,b:port``: see replicas.py) against ``reference``, appending
    results to ``out`` (errors to ``OUT.errors.jsonl``). Samples already in either file are
    skipped, so an interrupted run resumes where it stopped; an ``out`` of another job (another
    input file or reference) is refused unless ``overwrite`` (job_record.py). ``limit``: value
    at most this many new samples in this run. A call refused as UNAVAILABLE or RESOURCE_EXHAUSTED is retried
    ``retries`` times with backoff, resuming the same way. ``query_top``: instead of values, each
    sample's ``query_top`` most and least valuable stored samples from the server's index
    (Query; ``reference`` unused), the job identified by the index's fingerprint;
    ``query_where``: ``KEY=VALUE`` filters on the stored samples' metadata."""
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if query_where and query_top is None:
        raise ValueError("--where filters the stored samples of a query: give --query")
    parse_where(query_where)  # a malformed filter is refused before anything is sent
    samples = read_samples(input_path)
    ids = _unique_ids(samples)
    files = JobFiles(Path(out))
    with Client(server.split(","), token, tls=tls, root_certificates=root_certificates) as client:
        identity = _identity(client, input_path, reference, query_top, query_where)
        claim_output(files.job, (files.out, files.errors), identity, overwrite=overwrite)
        with ResultLog(files.out, sync_seconds=SYNC_SECONDS) as log:
            done = log.done("id")
            todo = [i for i, sample_id in enumerate(ids) if sample_id not in done][:limit]
            with tqdm(total=len(samples), initial=len(samples) - _remaining(ids, log), unit="sample",
                      desc=f"stream {Path(input_path).name}", disable=not progress) as bar:
                for attempt in range(retries + 1):
                    try:
                        payload = _payload(samples, ids, todo, Path(input_path).parent)
                        answers = (client.score_stream(payload, reference, priority=priority)
                                   if query_top is None
                                   else client.query_stream(payload, top=query_top, where=query_where))
                        _log_answers(answers, ids, todo, log, bar)
                        break
                    except ServerError as error:
                        if error.code not in RETRYABLE or attempt == retries:
                            raise
                        log.sync()
                        bar.write(f"forvalue: {error}; retrying in {2 ** attempt} s")
                        time.sleep(2 ** attempt)
                        done = log.done("id")
                        todo = [i for i in todo if ids[i] not in done]
    return {"scored": len(log.results), "errors": len(log.errors), "remaining": _remaining(ids, log),
            "out": str(out), "errors_file": str(errors_path(Path(out)))}


def _identity(client: Client, input_path: str | os.PathLike, reference: str | None,
              query_top: int | None, query_where: Sequence[str]) -> Any:
    """The job's identity: the input and the server's reference, or its index for queries."""
    if query_top is None:
        if reference is None:
            raise ValueError("give --reference NAME (or --query for the server's index)")
        return stream_identity(input_path, reference, _reference_info(client, reference).fingerprint)
    if query_top < 1:
        raise ValueError(f"--top must be positive, got {query_top}")
    index = client.stats()["index"]
    if not index:
        raise ValueError("the server has no index to query: start it with --index IDX")
    where = f" where {' '.join(sorted(query_where))}" if query_where else ""
    return stream_identity(input_path, f"query top {query_top}{where}", index)


def _payload(samples: list[Any], ids: list[str], todo: list[int], image_root: Path) -> Iterator[Any]:
    # Every sample goes out with an id, so a result maps back to its input line.
    return (resolve_image_paths({**samples[i], "id": ids[i]}, image_root) if isinstance(samples[i], dict)
            else samples[i] for i in todo)


def _log_answers(answers: Iterator[Any], ids: list[str], todo: list[int], log: ResultLog, bar: Any) -> None:
    for answer in answers:
        index = todo[answer.index]
        record: dict[str, Any] = {"id": ids[index], "index": index}
        if answer.error:
            record["error"] = answer.error
        elif isinstance(answer, QueryAnswer):
            record.update(most=answer.most, least=answer.least)
        else:
            record.update(value=answer.value, num_tokens=answer.num_tokens, num_labels=answer.num_labels,
                          **({"truncated": True} if answer.truncated else {}))
        log.add([record], failed=bool(answer.error))
        bar.update(1)


def _unique_ids(samples: list[Any]) -> list[str]:
    ids = [sample_id_of(sample, str(i)) for i, sample in enumerate(samples)]
    seen: set[str] = set()
    for i, sample_id in enumerate(ids):
        if sample_id in seen:
            raise ValueError(f"sample id {sample_id!r} appears twice (again at position {i}): "
                             f"resuming needs unique ids")
        seen.add(sample_id)
    return ids


def _remaining(ids: list[str], log: ResultLog) -> int:
    done = log.done("id")
    return sum(sample_id not in done for sample_id in ids)


def _reference_info(client: Client, reference: str) -> ReferenceInfo:
    infos = {info.name: info for info in client.list_references()}
    if reference not in infos:
        raise ValueError(f"the server has no reference {reference!r}; it has {list(infos) or 'none'}")
    return infos[reference]


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``forvalue stream``."""
    parser.add_argument("--server", required=True, metavar="HOST:PORT[,HOST:PORT...]",
                        help="the server, or replicas of it (comma-separated): one stream each, a "
                             "failed replica's samples re-sent to the others")
    parser.add_argument("--reference", metavar="NAME", help="a reference resident on the server")
    parser.add_argument("--query", action="store_true",
                        help="instead of values: each sample's most and least valuable stored training "
                             "samples from the server's index (forvalue serve --index)")
    parser.add_argument("--top", type=int, default=10, help="with --query: stored samples per side")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="with --query: only the stored samples whose \"meta\" has KEY equal to "
                             "VALUE (repeat: every key must match, a key given twice takes either value)")
    parser.add_argument("--input", required=True, type=Path,
                        help="samples: a JSONL file, a parquet file or a saved dataset folder")
    parser.add_argument("--out", required=True, type=Path,
                        help="results JSONL, appended to (errors go to OUT.errors.jsonl); rerun the same "
                             "command to resume")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the server's bearer token (or set FORVALUE_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate of a private CA (implies --tls)")
    parser.add_argument("--limit", type=int, help="value at most this many new samples in this run")
    parser.add_argument("--priority", type=int, default=0, help="lower runs first on a priority server")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries when the server is unavailable or overloaded (default: 3)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over when --out holds the results of another job (another input "
                             "file or reference; by default a rerun resumes the same job)")


def run_stream(args: argparse.Namespace) -> int:
    """``forvalue stream``; returns the exit status (1: the server failed, rerun to resume)."""
    try:
        summary = stream_file(args.server, args.reference, args.input, args.out,
                              token=read_token(args.token_file), tls=args.tls, root_certificates=args.tls_ca,
                              limit=args.limit, priority=args.priority, retries=args.retries,
                              overwrite=args.overwrite, query_top=args.top if args.query else None,
                              query_where=args.where)
    except ServerError as error:
        print(f"forvalue: error: server {args.server}: {error}; rerun the same command to resume",
              file=sys.stderr)
        return 1
    except ValueError as error:
        return user_error(error)
    print(json.dumps(summary))
    return 0
