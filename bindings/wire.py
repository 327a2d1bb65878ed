"""The wire format of the valuation service: protobuf messages <-> samples, results, reference
infos and statistics, both ways.

The clients and the server convert here, so a field is read beside where it is written. It
imports protobuf and numpy only (no torch, no grpc): the client SDK depends on it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import mimetypes
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import forvalue_pb2 as pb

# Names of references a caller may create, use and list (an upload's hidden name never matches).
REFERENCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class BadSample(ValueError):
    """A request whose sample cannot even be read (the engine checks readable ones)."""


@dataclass(frozen=True)
class TokenValues:
    """Per-token contributions of one sample; they sum to its value."""

    positions: np.ndarray
    token_ids: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class Result:
    """One sample's answer. ``error`` is "" when scored; then ``value`` is finite."""

    id: str
    value: float
    error: str
    num_tokens: int
    num_labels: int = 0
    truncated: bool = False
    reference: str = ""
    index: int = -1  # the sample's position in the samples given to score_stream
    token_values: TokenValues | None = None
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class QueryAnswer:
    """One queried sample's answer: the stored samples of highest and of lowest value for it,
    as ``(id, value)`` pairs, highest (lowest) first; ``error`` is "" when answered."""

    id: str
    most: list[tuple[str, float]]
    least: list[tuple[str, float]]
    error: str = ""
    index: int = -1  # the sample's position in the samples given to query_stream
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class ReferenceInfo:
    name: str
    count: int
    normalize: str
    loss_on: str
    skipped: int
    version: int
    precondition: str = "none"
    damping: float = 0.0
    covariance: str = ""
    fingerprint: str = ""  # equal on replicas that score alike


@dataclass(frozen=True)
class ReferenceOptions:
    """How the server builds an uploaded reference; None: the server's default."""

    normalize: str = "none"
    merge: bool = False
    precondition: str | None = None
    damping: float | None = None
    covariance: str | None = None


# ---------------------------------------------------------------------- samples


def sample_id(sample: Mapping[str, Any], position: int) -> str:
    """The name a result carries: the sample's own "id" (a string or an integer), else its
    position. The engine's rule (``forvalue.engine.inputs.samples.sample_id_of``), restated because
    the client SDK does not import the engine (torch)."""
    own = sample.get("id")
    if isinstance(own, str) or (isinstance(own, int) and not isinstance(own, bool)):
        return str(own)
    return str(position)


def score_request(wire_id: str, sample: Mapping[str, Any], reference: str, priority: int,
                  token_values: bool) -> pb.ScoreRequest:
    return pb.ScoreRequest(id=wire_id, reference=reference, priority=priority, token_values=token_values,
                           **_payload(sample))


def reference_sample(name: str, sample: Mapping[str, Any], options: ReferenceOptions) -> pb.ReferenceSample:
    return pb.ReferenceSample(name=name, normalize=options.normalize, merge=options.merge,
                              precondition=options.precondition or "", damping=options.damping or 0.0,
                              covariance=options.covariance or "", **_payload(sample))


def sample_of(message: pb.ScoreRequest | pb.ReferenceSample | pb.QueryRequest) -> Any:
    """The sample a message carries, as the engine takes it; the engine checks the rest."""
    kind = message.WhichOneof("sample")
    name = f"request {getattr(message, 'id', '')!r}"
    if kind == "fields":
        return _fields_sample(message.fields, name)
    if kind != "json":
        raise BadSample(f"{name}: carries no sample")
    try:
        sample = json.loads(message.json)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise BadSample(f"{name}: the sample is not valid JSON ({error})") from None
    for _, source in _image_sources(sample):
        if not (isinstance(source, str) and source.startswith("data:")):
            # The server opens no file for a client: an image arrives with the request.
            raise BadSample(f"{name}: an image sent to the server is bytes (the fields form) or a "
                            "base64 data URI, not a path")
    return sample


def _fields_sample(fields: pb.Sample, name: str) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    for key in ("id", "prompt", "response", "text"):
        if fields.HasField(key):
            sample[key] = getattr(fields, key)
    if fields.messages:
        sample["messages"] = [{"role": m.role, "content": [_part_of(p, name) for p in m.parts] if m.parts
                               else m.content} for m in fields.messages]
    for key in ("input_ids", "loss_mask", "labels"):
        if getattr(fields, key):
            sample[key] = list(getattr(fields, key))
    return sample


def _part_of(part: pb.ContentPart, name: str) -> dict[str, Any]:
    if part.WhichOneof("part") == "text":
        return {"type": "text", "text": part.text}
    mime = part.image.mime_type
    if mime and not mime.startswith("image/"):
        raise BadSample(f"{name}: an image part holds {mime!r}, not an image")
    return {"type": "image", "image": part.image.data}


# ---------------------------------------------------------------------- images (client side)


def _image_sources(sample: Any) -> list[tuple[dict[str, Any], Any]]:
    """(part, source) of each image part of a chat sample."""
    messages = sample.get("messages") if isinstance(sample, Mapping) else None
    if not isinstance(messages, list):
        return []
    return [(part, part.get("image")) for message in messages if isinstance(message, Mapping)
            and isinstance(message.get("content"), list) for part in message["content"]
            if isinstance(part, Mapping) and part.get("type") == "image"]


def resolve_image_paths(sample: Any, root: str | os.PathLike) -> Any:
    """The sample with each image given as a relative path made to start at ``root`` (a JSONL
    file's folder: where the local jobs look for its images), so that the client finds it
    whatever its working directory."""
    if not _image_sources(sample):
        return sample

    def at_root(part: Any) -> Any:
        source = part.get("image") if isinstance(part, Mapping) and part.get("type") == "image" else None
        if not isinstance(source, str) or source.startswith("data:") or "://" in source \
                or os.path.isabs(source):
            return part
        return {**part, "image": os.path.join(root, source)}

    messages = [{**m, "content": [at_root(part) for part in m["content"]]}
                if isinstance(m, Mapping) and isinstance(m.get("content"), list) else m
                for m in sample["messages"]]
    return {**sample, "messages": messages}


def _payload(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A sample with images travels in the fields form, each image as bytes with its MIME type
    (a path is read here, by the client); any other sample as JSON."""
    if not _image_sources(sample):
        return {"json": json.dumps(sample)}
    extra = set(sample) - {"id", "meta", "messages"}
    if extra:
        raise BadSample(f"sample {sample_id(sample, 0)!r}: a sample with images is chat messages "
                        f"(with an optional id and meta), not {sorted(extra)}")
    fields = pb.Sample(messages=[_message(m, sample) for m in sample["messages"]])
    if "id" in sample:
        fields.id = str(sample["id"])
    return {"fields": fields}


def _message(message: Mapping[str, Any], sample: Mapping[str, Any]) -> pb.ChatMessage:
    content = message.get("content")
    if not isinstance(content, list):
        return pb.ChatMessage(role=message.get("role", ""), content=content)
    parts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
            raise BadSample(f"sample {sample_id(sample, 0)!r}: a content part is "
                            '{"type": "text", "text": ...} or {"type": "image", "image": ...}')
        parts.append(pb.ContentPart(text=part.get("text", "")) if part["type"] == "text"
                     else pb.ContentPart(image=_image(part.get("image"), sample)))
    return pb.ChatMessage(role=message.get("role", ""), parts=parts)


def _image(source: Any, sample: Mapping[str, Any]) -> pb.Image:
    """Bytes as they are, a base64 data URI decoded, a path read (from the client's disk)."""
    name = f"sample {sample_id(sample, 0)!r}"
    if isinstance(source, (bytes, bytearray)):
        return pb.Image(data=bytes(source))
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        try:
            return pb.Image(data=base64.b64decode(payload, validate=True),
                            mime_type=header[len("data:"):].split(";")[0])
        except (binascii.Error, ValueError):
            raise BadSample(f"{name}: an image data URI is not valid base64") from None
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as file:
                return pb.Image(data=file.read(), mime_type=mimetypes.guess_type(os.fspath(source))[0] or "")
        except OSError as error:
            raise BadSample(f"{name}: cannot read image {os.fspath(source)!r}: {error.strerror}") from None
    raise BadSample(f"{name}: the client sends an image given as bytes, a path or a data URI, "
                    f"not a {type(source).__name__}")


# ---------------------------------------------------------------------- results


def score_result_message(result: Any, client_id: str) -> pb.ScoreResult:
    """The message of an engine ScoreResult, under the id the caller gave its request."""
    message = pb.ScoreResult(id=client_id or result.id, reference=result.reference, value=result.value,
                             error=result.error, num_tokens=result.num_tokens,
                             num_labels=result.num_labels, truncated=result.truncated,
                             queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds)
    tokens = result.token_values
    if tokens is not None:
        message.token_values.positions.extend(tokens.positions.tolist())
        message.token_values.token_ids.extend(tokens.token_ids.tolist())
        message.token_values.values.extend(tokens.values.tolist())
    return message


def result_of(message: pb.ScoreResult, name: str, index: int) -> Result:
    """A caller's Result; ``name`` and ``index`` say which of its samples the request carried."""
    tokens = None
    if message.HasField("token_values"):
        t = message.token_values
        tokens = TokenValues(np.array(t.positions, dtype=np.int64), np.array(t.token_ids, dtype=np.int64),
                             np.array(t.values, dtype=np.float64))
    value = math.nan if message.error else message.value
    return Result(name, value, message.error, message.num_tokens, message.num_labels,
                  message.truncated, message.reference, index, tokens, message.queue_seconds,
                  message.compute_seconds)


def query_request(wire_id: str, sample: Mapping[str, Any], top: int,
                  where: Sequence[str] = ()) -> pb.QueryRequest:
    """``where``: ``KEY=VALUE`` filters on the stored samples' metadata."""
    return pb.QueryRequest(id=wire_id, top=top, where=list(where), **_payload(sample))


def query_result_message(wire_id: str, answer: Mapping[str, Any], seconds: float) -> pb.QueryResult:
    """The message of one answer of ``Index.query`` (``{"most", "least"}`` or ``{"error"}``)."""

    def neighbors(side: str) -> list[pb.Neighbor]:
        return [pb.Neighbor(id=n["id"], value=n["value"]) for n in answer.get(side, [])]

    return pb.QueryResult(id=wire_id, most=neighbors("most"), least=neighbors("least"),
                          error=answer.get("error", ""), compute_seconds=seconds)


def query_answer_of(message: pb.QueryResult, name: str, index: int) -> QueryAnswer:
    """A caller's QueryAnswer; ``name`` and ``index`` say which of its samples it answers."""
    most, least = ([(n.id, n.value) for n in side] for side in (message.most, message.least))
    return QueryAnswer(name, most, least, message.error, index, message.compute_seconds)


# ---------------------------------------------------------------------- references and statistics


def reference_info_message(info: Any) -> pb.ReferenceInfo:
    """The message of an engine ReferenceInfo."""
    return pb.ReferenceInfo(name=info.name, count=info.count, normalize=info.normalize,
                            loss_on=info.loss_on, skipped=info.skipped, version=info.version,
                            precondition=info.precondition, damping=info.damping,
                            covariance=info.covariance, fingerprint=info.fingerprint)


def reference_info_of(message: pb.ReferenceInfo) -> ReferenceInfo:
    return ReferenceInfo(message.name, message.count, message.normalize, message.loss_on,
                         message.skipped, message.version, message.precondition or "none",
                         message.damping, message.covariance, message.fingerprint)


def stats_message(stats: Any, active_streams: int, prometheus_text: str, index: str = "") -> pb.Stats:
    """The message of the engine's stats, with the server's own figures (``index``: the
    fingerprint of its index)."""
    latency = {phase: pb.Quantiles(p50=q.get(0.5, 0.0), p90=q.get(0.9, 0.0), p99=q.get(0.99, 0.0))
               for phase, q in stats.latency.items()}
    return pb.Stats(waiting=stats.waiting, running=stats.running, references=stats.references,
                    steps=stats.steps, tokens_total=stats.tokens_total,
                    tokens_per_second=stats.tokens_per_second, requests=stats.requests,
                    latency=latency, active_streams=active_streams, prometheus_text=prometheus_text,
                    index=index)


def stats_of(message: pb.Stats) -> dict[str, Any]:
    stats = {name: getattr(message, name) for name in (
        "waiting", "running", "references", "steps", "tokens_total", "tokens_per_second",
        "active_streams", "prometheus_text", "index")}
    stats["requests"] = dict(message.requests)
    stats["latency"] = {phase: {"p50": q.p50, "p90": q.p90, "p99": q.p99}
                        for phase, q in message.latency.items()}
    return stats
