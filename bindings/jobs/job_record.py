"""What a resumable output is the output of: its job's identity, recorded beside it.

``forvalue score``, ``select``, ``stream`` and their ``--ray`` jobs append values to ``--out``
and resume from what is there. Before the first value, the job's identity (the model and
adapter files, dtype and device, every option that changes the values, fingerprints of the
training and validation inputs and of a covariance file, the shard, the forvalue version) is
written atomically to ``OUT.job.json``. A rerun into the same ``--out`` compares: the same
identity resumes; another one is refused in one line that names what differs, unless
``--overwrite`` starts over. Inputs are compared by the fingerprint of their bytes, not by
path, so a moved file resumes and a file rewritten under the same name does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forvalue.engine.atomic import write_atomically
from forvalue.engine.config import ValuationConfig
from forvalue.engine.version import __version__

FORMAT = "forvalue.job/1"
CHUNK = 1 << 20
SAMPLED_CHUNKS = 16  # a model file is fingerprinted from its size and this many evenly spaced chunks


class JobMismatch(ValueError):
    """An output of another job (or of an unknown one) where this job would resume."""


@dataclass(frozen=True)
class JobIdentity:
    """``compared``: what must be equal for a rerun to resume; ``named``: where each input was
    read from (shown in messages, never compared)."""

    compared: dict[str, Any]
    named: dict[str, str] = field(default_factory=dict)

    def differences(self, recorded: JobIdentity) -> list[str]:
        """What differs, as ``key: recorded X, now Y`` (the input's path beside a fingerprint)."""
        ours, theirs = _flat(self.compared), _flat(recorded.compared)
        return [f"{key}: recorded {_shown(theirs.get(key), recorded.named.get(key))}, now "
                f"{_shown(ours.get(key), self.named.get(key))}"
                for key in sorted(ours.keys() | theirs.keys()) if ours.get(key) != theirs.get(key)]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "identity": self.compared, "paths": self.named}


def claim_output(record: Path, outputs: Sequence[Path], identity: JobIdentity, *, overwrite: bool) -> None:
    """Before the first value: resume (the record there has this identity), start over
    (``overwrite``, or nothing written yet: every file of ``outputs`` removed, this identity
    recorded), or refuse in one line."""
    existing = [path for path in outputs if path.exists() and path.stat().st_size > 0]
    if existing and not overwrite:
        recorded = read_record(record) if record.exists() else None
        if recorded is None:
            raise JobMismatch(f"{existing[0]} was written without a job record ({record.name}), so "
                              f"resuming it could mix jobs: rerun with --overwrite to start over, or "
                              f"choose another --out")
        if recorded is not None:
            differences = identity.differences(recorded)
            if differences:
                raise JobMismatch(f"{outputs[0]} holds values of another job ({listed(differences)}): "
                                  f"rerun with --overwrite to start over, or choose another --out")
            return
    for path in [*outputs, record]:
        path.unlink(missing_ok=True)
    write_record(record, identity)


def listed(differences: Sequence[str], most: int = 4) -> str:
    """The first few differences, in one line."""
    return "; ".join(differences[:most]) + ("; ..." if len(differences) > most else "")


def read_record(path: Path) -> JobIdentity:
    """The identity recorded in ``path`` (a clear error when it is not a job record)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        return JobIdentity(data["identity"], data.get("paths", {}))
    except (ValueError, KeyError, AttributeError) as error:
        raise JobMismatch(f"{path} is not a readable job record ({error}): rerun with --overwrite "
                          f"to start over, or choose another --out") from None


def write_record(path: Path, identity: JobIdentity) -> None:
    """Written whole or not at all (a temporary file, fsynced, renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(identity.to_json(), indent=1, sort_keys=True) + "\n"
    write_atomically(path, lambda file: file.write(text))


def batch_identity(args: Any, command: str, mode: str, config: ValuationConfig,
                   fields: Mapping[str, str]) -> JobIdentity:
    """The identity of a ``score`` or ``select`` job (local or ``--ray``) from its parsed flags."""
    compared: dict[str, Any] = {
        "command": command, "mode": mode, "forvalue_version": __version__,
        "model": model_source(args.model), "adapter": model_source(args.adapter) if args.adapter else None,
        "dtype": args.dtype, "device": args.device, "options": config.value_options(),
        "train": file_fingerprint(args.train), "split": args.split, "fields": dict(fields),
        "shard": getattr(args, "shard", None) or "0/1",
    }
    if getattr(args, "backbone", "hf") != "hf":  # (records of the native backbone predate the key)
        compared["backbone"] = args.backbone
    named = {"train": str(args.train)}
    if mode != "self":
        compared["valid"] = file_fingerprint(args.valid)
        named["valid"] = str(args.valid)
    if args.covariance != "valid":
        compared["covariance"] = file_fingerprint(args.covariance)
        named["covariance"] = str(args.covariance)
    return JobIdentity(compared, named)


def claim_batch_output(args: Any, command: str, mode: str, config: ValuationConfig, files: Any,
                       fields: Mapping[str, str]) -> None:
    """``claim_output`` for the files (a ``shards.JobFiles``) of a ``score`` or ``select`` job."""
    identity = batch_identity(args, command, mode, config, fields)
    claim_output(files.job, files.outputs, identity, overwrite=args.overwrite)


def stream_identity(input_path: str | os.PathLike, reference: str, fingerprint: str) -> JobIdentity:
    """The identity of a ``stream`` job: the input's bytes and the server's reference (its
    fingerprint covers the model, the options and the validation sums; replicas share it)."""
    return JobIdentity({"command": "stream", "forvalue_version": __version__,
                        "input": file_fingerprint(input_path), "reference": reference,
                        "reference_fingerprint": fingerprint}, {"input": str(input_path)})


def model_source(name: str) -> dict[str, str]:
    """A model or adapter as the job names it: a local folder (or file) by a fingerprint of its
    files (sizes and sampled chunks: cheap for large weights, and any retraining changes it),
    anything else (an embedded name, a cached Hugging Face id) by its name."""
    path = Path(name)
    if not path.exists():
        return {"name": name}
    return {"name": name, "files": _digest(path, sampled=True)}


def file_fingerprint(path: str | os.PathLike | None) -> str | None:
    """A digest of every byte of a samples file or folder (a saved dataset); None when there is
    none (the job then fails on the missing input with its own message)."""
    return None if path is None or not Path(path).exists() else _digest(Path(path), sampled=False)


def _digest(path: Path, *, sampled: bool) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}\0{file.stat().st_size}\0".encode())
        for chunk in _chunks(file, sampled):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def _chunks(file: Path, sampled: bool) -> Iterable[bytes]:
    size = file.stat().st_size
    with file.open("rb") as f:
        if not sampled or size <= SAMPLED_CHUNKS * CHUNK:
            yield from iter(lambda: f.read(CHUNK), b"")
            return
        for k in range(SAMPLED_CHUNKS):
            f.seek((size - CHUNK) * k // (SAMPLED_CHUNKS - 1))
            yield f.read(CHUNK)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any, path: str | None) -> str:
    text = ("no file" if path else "none") if value is None else repr(value)
    return f"{text} ({path})" if path else text
