"""The wire format of the valuation service: protobuf messages <-> samples, results, reference
infos and statistics, both ways.

The clients and the server convert here, so a field is read beside where it is written. It
imports protobuf and numpy only (no torch, no grpc): the client SDK depends on it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
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
    position. The engine's rule (``forvalue.engine.samples.sample_id_of``), restated because
    the client SDK does not import the engine (torch)."""
    own = sample.get("id")
    if isinstance(own, str) or (isinstance(own, int) and not isinstance(own, bool)):
        return str(own)
    return str(position)


def score_request(wire_id: str, sample: Mapping[str, Any], reference: str, priority: int,
                  token_values: bool) -> pb.ScoreRequest:
    return pb.ScoreRequest(id=wire_id, reference=reference, json=json.dumps(sample), priority=priority,
                           token_values=token_values)


def reference_sample(name: str, sample: Mapping[str, Any], options: ReferenceOptions) -> pb.ReferenceSample:
    return pb.ReferenceSample(name=name, normalize=options.normalize, merge=options.merge,
                              precondition=options.precondition or "", damping=options.damping or 0.0,
                              covariance=options.covariance or "", json=json.dumps(sample))


def sample_of(message: pb.ScoreRequest | pb.ReferenceSample) -> Any:
    """The sample a message carries, as the engine takes it; the engine checks the rest."""
    kind = message.WhichOneof("sample")
    if kind == "fields":
        return _fields_sample(message.fields)
    if kind != "json":
        raise BadSample(f"request {getattr(message, 'id', '')!r}: carries no sample")
    try:
        return json.loads(message.json)
    except (ValueError, RecursionError) as error:  # RecursionError: absurdly deep nesting
        raise BadSample(f"request {getattr(message, 'id', '')!r}: the sample is not valid JSON "
                        f"({error})") from None


def _fields_sample(fields: pb.Sample) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    for name in ("id", "prompt", "response", "text"):
        if fields.HasField(name):
            sample[name] = getattr(fields, name)
    if fields.messages:
        sample["messages"] = [{"role": m.role, "content": m.content} for m in fields.messages]
    for name in ("input_ids", "loss_mask", "labels"):
        if getattr(fields, name):
            sample[name] = list(getattr(fields, name))
    return sample


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


def stats_message(stats: Any, active_streams: int, prometheus_text: str) -> pb.Stats:
    """The message of the engine's stats, with the server's own figures."""
    latency = {phase: pb.Quantiles(p50=q.get(0.5, 0.0), p90=q.get(0.9, 0.0), p99=q.get(0.99, 0.0))
               for phase, q in stats.latency.items()}
    return pb.Stats(waiting=stats.waiting, running=stats.running, references=stats.references,
                    steps=stats.steps, tokens_total=stats.tokens_total,
                    tokens_per_second=stats.tokens_per_second, requests=stats.requests,
                    latency=latency, active_streams=active_streams, prometheus_text=prometheus_text)


def stats_of(message: pb.Stats) -> dict[str, Any]:
    stats = {name: getattr(message, name) for name in (
        "waiting", "running", "references", "steps", "tokens_total", "tokens_per_second",
        "active_streams", "prometheus_text")}
    stats["requests"] = dict(message.requests)
    stats["latency"] = {phase: {"p50": q.p50, "p90": q.p90, "p99": q.p99}
                        for phase, q in message.latency.items()}
    return stats
