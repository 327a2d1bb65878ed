"""Batch valuation on Ray Data: an actor pool, each actor with one resident model, the
reference shipped once (a file every worker reads, or one object-store copy per node).

    import ray
    from forvalue.bindings.ray_jobs import read_dataset, score_dataset
    ds = read_dataset("train.jsonl")                          # or any ray.data.Dataset
    results = score_dataset(ds, model="path/to/model", reference="ref.safetensors", actors=4)
    results.iter_rows()  # {"id", "index", "value", "error"} per sample, in completion order

Rows become samples as the local readers make them (``engine/inputs/readers.py``: JSON lines as they
are, table columns by ``fields`` with the rest under "meta"). Ray Data keeps neither order nor
positions, so ``with_index`` numbers the rows first, in input order: one pass of the input
through the driver (blocks only, never parsed there), kept in the object store. The job in
``bindings/cli/ray_job.py`` restores order and resumes from that index. ``reference`` and ``covariance``
may also be built on the pool (``build_reference``, ``build_covariance``): partial sums per
batch, merged exactly on the driver (docs/design.md, "Preconditioned value", Storage).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forvalue.engine import Covariance, Reference, Valuator, load_model
from forvalue.engine.config import ValuationConfig
from forvalue.engine.inputs.readers import map_row, parse_line
from forvalue.engine.inputs.samples import SampleError, SampleList, sample_id_of

INSTALL_HINT = "pip install 'forvalue[ray]'"
INDEX = "__forvalue_index"  # a row's position in the input (never a sample key)
LINE = "__forvalue_line"  # a JSONL line, parsed on the workers
LINE_NUMBER = "__forvalue_line_number"  # its number in the file (blank lines count)
RETRIES = 2  # restarts of a dead actor, and retries of its unfinished batch
BLOCK_ROWS = 64  # rows per block of the numbered input (the local job's checkpoint)
# Test-only: a file whose presence makes the next actor batch exit the process (removed first).
CRASH_FLAG_ENV = "FORVALUE_TEST_CRASH_FLAG"


def import_ray() -> Any:
    """The ray module, or a one-line error that says how to install it."""
    try:
        import ray
        import ray.data  # ray without its data extra lacks it
    except ImportError:
        raise ValueError(f"--ray needs Ray Data: {INSTALL_HINT}") from None
    return ray


def init_ray(address: str | None = None) -> Any:
    """Join the cluster at ``address``, or start a local Ray on this machine's CPUs."""
    ray = import_ray()
    if not ray.is_initialized():
        if address is not None:
            _check_reachable(address)
        try:
            if address is None:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
            else:
                ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ValueError(f"cannot reach the Ray cluster at {address}: {first_line(error)}") from None
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per stage is noise in a CLI
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` that does not answer is an error now (ray.init would retry for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {error}") from None


# ---------------------------------------------------------------------- input


@dataclass(frozen=True)
class Source:
    """A dataset to value and how its rows become samples."""

    dataset: Any  # ray.data.Dataset
    name: str  # for error messages ("train.jsonl sample 7")
    jsonl: bool  # rows are JSON lines (LINE), else table rows
    indexed: bool = False  # rows carry INDEX (``with_index``)


def read_dataset(path: str | os.PathLike, *, split: str | None = None) -> Source:
    """A ``.jsonl`` file, a ``.parquet`` file or folder, or a ``datasets.save_to_disk`` folder;
    a URI (``s3://...``) is read by the workers, a local path is made absolute first."""
    ray = import_ray()
    name = os.fspath(path)
    if "://" not in name:
        local = Path(name).resolve()
        if not local.exists():
            raise FileNotFoundError(f"no such samples file: {name}")
        if local.is_dir() and not any(local.glob("*.parquet")):
            return Source(ray.data.from_huggingface(_saved_dataset(local, split)), name, False)
        if local.is_dir():
            return Source(ray.data.read_parquet(str(local)), name, False)
        path = str(local)
    else:
        path = name
    if name.endswith(".parquet") or name.endswith("/"):
        return Source(ray.data.read_parquet(path), name, False)
    return Source(ray.data.read_text(path, drop_empty_lines=False), name, True)


def _saved_dataset(path: Path, split: str | None) -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError("reading a saved dataset needs datasets: pip install 'forvalue[data]'") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} holds splits {list(loaded)}: choose one with --split")
        loaded = loaded[split]
    return loaded


def check_columns(source: Source, fields: Mapping[str, str]) -> None:
    """A mapped column the table lacks is a job error, found before any worker starts."""
    if source.jsonl or not fields:
        return
    columns = set(source.dataset.schema().names)
    missing = sorted(column for column in fields.values() if column not in columns)
    if missing:
        raise ValueError(f"{source.name} has no column {missing} (columns: {sorted(columns)})")


def with_index(source: Source, done: set[int] = frozenset(), *,
               block_rows: int = BLOCK_ROWS) -> tuple[Source, int]:
    """The rows numbered in input order (blank JSON lines skipped, as the local reader does),
    without the ``done`` ones; and the number of rows. The blocks pass once through the driver
    in order (Ray Data's order is only kept while ``preserve_order`` is set) into the store,
    cut to ``block_rows``: a block is what one actor task takes, so a file read as one block
    would keep every actor but one idle."""
    ray = import_ray()
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    refs, total, lines, pending = [], 0, 0, None
    skip = np.fromiter(done, dtype=np.int64, count=len(done))
    with _preserve_order(ray):
        for table in source.dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            if source.jsonl:  # numbered by line, as the local reader's errors say
                text = table.column("text")
                numbers = pa.array(np.arange(lines + 1, lines + 1 + table.num_rows, dtype=np.int64))
                lines += table.num_rows
                table = pa.table({LINE: text, LINE_NUMBER: numbers}).filter(
                    pc.not_equal(pc.utf8_trim_whitespace(text), ""))
            index = np.arange(total, total + table.num_rows, dtype=np.int64)
            total += table.num_rows
            table = table.append_column(INDEX, pa.array(index))
            table = table.filter(pa.array(~np.isin(index, skip)))
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= block_rows:
                refs.append(ray.put(pending.slice(0, block_rows)))
                pending = pending.slice(block_rows)
    if pending is not None and pending.num_rows:
        refs.append(ray.put(pending))
    dataset = ray.data.from_arrow_refs(refs) if refs else ray.data.from_items([])
    return Source(dataset, source.name, source.jsonl, indexed=True), total


@contextlib.contextmanager
def _preserve_order(ray: Any) -> Iterator[None]:
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


# ---------------------------------------------------------------------- the actors


@dataclass(frozen=True)
class Job:
    """What every actor needs, sent once when it starts (never per batch)."""

    model: str
    config: ValuationConfig
    model_options: dict[str, Any] = field(default_factory=dict)  # device, dtype, adapter
    reference: Any = None  # a .safetensors path or an ObjectRef of a Reference
    covariance: str | None = None  # a covariance file every worker can read
    fields: dict[str, str] = field(default_factory=dict)
    source: str = "input"
    jsonl: bool = False
    mode: str = "reference"  # reference | self | build | covariance


class _Worker:
    """One resident model and Valuator; ``__call__`` values one batch of rows."""

    def __init__(self, job: Job) -> None:
        self.job = job
        covariance = Covariance.load(job.covariance) if job.covariance else None
        model = load_model(job.model, **job.model_options)
        self.valuator = Valuator(model, config=job.config, covariance=covariance, progress=False)
        self.reference = _resolve_reference(job.reference) if job.mode == "reference" else None

    def __call__(self, batch: Any) -> dict[str, list]:
        _crash_if_flagged()
        indices = batch.column(INDEX).to_pylist()
        rows = batch.drop_columns([INDEX]).to_pylist()
        samples, places, where, records = [], [], [], {}
        for index, row in zip(indices, rows, strict=True):
            try:
                samples.append(self._sample(row, index))
                places.append(index)
                where.append(row.get(LINE_NUMBER, index))
            except SampleError as error:
                records[index] = (str(index), math.nan, str(error))
        if self.job.mode in ("build", "covariance"):
            return self._part(samples, places, where, len(records))
        values, failures = self._values(self._list(samples, where))
        failed = {error.index: str(error) for error in failures}
        for position, (index, sample) in enumerate(zip(places, samples, strict=True)):
            records[index] = (sample_id_of(sample, str(index)), float(values[position]),
                              failed.get(position, ""))
        return {"id": [records[i][0] for i in indices], "index": indices,
                "value": [records[i][1] for i in indices], "error": [records[i][2] for i in indices]}

    def _sample(self, row: dict[str, Any], index: int) -> Any:
        """The sample of a row, as the local readers make it (``where`` as they say it)."""
        if self.job.jsonl:
            where = f"{self.job.source} line {row[LINE_NUMBER]}"
            row = parse_line(row[LINE].encode("utf-8"), where=where)
            return map_row(row, self.job.fields, where) if self.job.fields else row
        return map_row(row, self.job.fields, f"{self.job.source} row {index}")

    def _values(self, samples: SampleList) -> tuple[Any, list[SampleError]]:
        if not samples:
            return [], []
        if self.job.mode == "self":
            return self.valuator.self_value(samples, errors="collect")
        return self.valuator.score(samples, self.reference, errors="collect")

    def _list(self, samples: list, where: list[int]) -> SampleList:
        """The batch's samples, keeping their place in the input for error messages."""
        return SampleList(samples, source=self.job.source, lines=where,
                          unit="line" if self.job.jsonl else "row")

    def _part(self, samples: list, places: list[int], where: list[int], unreadable: int) -> dict[str, list]:
        """A partial reference or covariance of this batch (pickled: it goes to the driver)."""
        part, failures = None, []
        if samples:
            build = self.valuator.reference if self.job.mode == "build" else self.valuator.covariance
            try:
                part, failures = build(self._list(samples, where), errors="collect")
            except ValueError:  # no valid sample in this batch
                failures = samples
        return {"first": [min(places, default=-1)], "skipped": [unreadable + len(failures)],
                "part": [pickle.dumps(part)]}


def _absolute(path: str | None) -> str | None:
    """A path that exists here, made absolute; anything else (a model name, None) as it is."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _resolve_reference(reference: Any) -> Reference:
    if isinstance(reference, (str, os.PathLike)):
        return Reference.load(reference)
    if isinstance(reference, Reference):
        return reference
    return import_ray().get(reference)


def _crash_if_flagged() -> None:
    flag = os.environ.get(CRASH_FLAG_ENV)
    if not flag:
        return
    try:  # unlinking is atomic: of actors racing for one flag, exactly one crashes
        os.remove(flag)
    except FileNotFoundError:
        return
    os._exit(1)


def _map(source: Source, job: Job, *, actors: int, gpus_per_actor: float, batch_size: int) -> Any:
    """``job`` over ``source`` on a pool of ``actors``; Ray restarts a dead actor and retries
    its batch at most RETRIES times, then the job fails."""
    ray = import_ray()
    if actors < 1:
        raise ValueError(f"--actors must be positive, got {actors}")
    if gpus_per_actor < 0:
        raise ValueError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    # Workers do not share the driver's working directory: local paths go absolute.
    options = {**job.model_options, "adapter": _absolute(job.model_options.get("adapter"))}
    job = Job(**{**job.__dict__, "source": source.name, "jsonl": source.jsonl, "model": _absolute(job.model),
                 "model_options": options, "covariance": _absolute(job.covariance),
                 "reference": _absolute(job.reference) if isinstance(job.reference, str) else job.reference})
    return source.dataset.map_batches(
        _Worker, fn_constructor_args=(job,), batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None,
        max_restarts=RETRIES, max_task_retries=RETRIES)


# ---------------------------------------------------------------------- entry points


def score_dataset(dataset: Any, *, model: str, reference: Any = None, config: ValuationConfig | None = None,
                  covariance: str | None = None, fields: Mapping[str, str] | None = None,
                  mode: str = "reference", actors: int = 2, gpus_per_actor: float = 0,
                  batch_size: int = 64, model_options: Mapping[str, Any] | None = None) -> Any:
    """Value a ``ray.data.Dataset`` (or a ``Source`` of ``read_dataset``/``with_index``);
    returns a lazy Dataset of ``{"id", "index", "value", "error"}`` rows, ``error`` "" when
    valued. ``reference``: a Reference, its file or an ObjectRef (put once in the object
    store when given as an object); mode "self" values ``||G(x)||^2`` and needs none."""
    ray = import_ray()
    if mode not in ("reference", "self"):
        raise ValueError(f"mode must be 'reference' or 'self' on Ray, got {mode!r}")
    if mode == "reference" and reference is None:
        raise ValueError("mode reference needs a reference (a Reference, its file or an ObjectRef)")
    source = dataset if isinstance(dataset, Source) else Source(dataset, "input", False)
    if not source.indexed:
        source, _ = with_index(source, block_rows=batch_size)
    if isinstance(reference, Reference):
        reference = ray.put(reference)
    job = Job(str(model), config or ValuationConfig(), dict(model_options or {}), reference,
              covariance, dict(fields or {}), mode=mode)
    return _map(source, job, actors=actors, gpus_per_actor=gpus_per_actor, batch_size=batch_size)


def build_reference(dataset: Any, *, model: str, config: ValuationConfig | None = None,
                    covariance: str | None = None, fields: Mapping[str, str] | None = None,
                    actors: int = 2, gpus_per_actor: float = 0,
                    model_options: Mapping[str, Any] | None = None) -> tuple[Reference, int]:
    """The Reference of a validation dataset built on the pool (one part per actor, merged on
    the driver), and the number of samples skipped. A cosine reference preconditioned with its
    own samples' ``A`` cannot be merged: it is built by one actor."""
    config = config or ValuationConfig()
    whole = config.precondition is not None and config.normalize == "cosine" and covariance is None
    parts, skipped = _parts(dataset, "build", model, config, covariance, fields,
                            1 if whole else actors, gpus_per_actor, model_options)
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    total.info = {**total.info, "skipped": str(skipped)}
    return total, skipped


def build_covariance(dataset: Any, *, model: str, config: ValuationConfig | None = None,
                     fields: Mapping[str, str] | None = None, actors: int = 2, gpus_per_actor: float = 0,
                     model_options: Mapping[str, Any] | None = None) -> tuple[Covariance, int]:
    """``sum h h^T`` of a dataset on the pool, merged on the driver in input order (its
    fingerprint combines the parts'), and the number of samples skipped."""
    parts, skipped = _parts(dataset, "covariance", model, config or ValuationConfig(), None, fields,
                            actors, gpus_per_actor, model_options)
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total, skipped


def _parts(dataset: Any, mode: str, model: str, config: ValuationConfig, covariance: str | None,
           fields: Mapping[str, str] | None, actors: int, gpus_per_actor: float,
           model_options: Mapping[str, Any] | None) -> tuple[list[Any], int]:
    """One batch per actor, each summed by the Valuator; the parts in input order."""
    raw = dataset if isinstance(dataset, Source) else Source(dataset, "input", False)
    source, total = with_index(raw)
    if total < actors * BLOCK_ROWS:  # fewer blocks than actors: cut the (small) set again
        source, total = with_index(raw, block_rows=max(1, math.ceil(total / actors)))
    job = Job(str(model), config, dict(model_options or {}), None, covariance, dict(fields or {}), mode=mode)
    rows = _map(source, job, actors=actors, gpus_per_actor=gpus_per_actor,
                batch_size=max(1, math.ceil(total / actors))).take_all()
    rows.sort(key=lambda row: row["first"])
    parts = [pickle.loads(row["part"]) for row in rows]  # our own actors' output
    skipped = sum(row["skipped"] for row in rows)
    parts = [part for part in parts if part is not None]
    if not parts:
        raise ValueError(f"no valid sample in {source.name} ({skipped} skipped)")
    return parts, skipped


def first_line(error: BaseException) -> str:
    """An error in one line (Ray's carry a traceback)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
