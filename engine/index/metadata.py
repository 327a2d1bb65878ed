"""Per-sample metadata in an index, and the filter ``where`` that select and query take.

Each stored sample keeps its ``"meta"`` object in its shard's header beside the ids. ``where``
maps a key to the values accepted: ``{"lang": ["en", "de"], "split": ["web"]}`` keeps the
samples whose lang is en or de and whose split is web; a sample without the key is left out.
Values compare as text (a string as itself, anything else as its JSON: ``1``, ``true``), so the
command line's ``--where KEY=VALUE`` reaches every kind of value.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

Where = Mapping[str, Collection[str]]
MAX_HEADER_TEXT = 64 << 20


def sample_metadata(sample: Mapping[str, Any]) -> dict[str, Any]:
    """What an index keeps of a sample for filtering: its ``"meta"`` object, if it has one."""
    meta = sample.get("meta")
    return meta if isinstance(meta, dict) else {}


def encode_metadata(metas: Sequence[dict[str, Any]]) -> str | None:
    """A shard's metadata as header text (None: no sample has any)."""
    if not any(metas):
        return None
    text = json.dumps(list(metas), default=str)
    if len(text) > MAX_HEADER_TEXT:  # safetensors refuses headers over 100 MB
        raise ValueError(f"the \"meta\" objects of one shard's samples take {len(text) >> 20} MiB: keep "
                         f"in \"meta\" what you filter on, or store fewer samples per shard")
    return text


def decode_metadata(text: str | None, samples: int) -> list[dict[str, Any]]:
    """A shard's metadata from its header text (raises ValueError for anything but one object
    per sample)."""
    metas = json.loads(text) if text else [{}] * samples
    if not isinstance(metas, list) or not all(isinstance(m, dict) for m in metas):
        raise ValueError("its metadata is not a list of objects")
    if len(metas) != samples:
        raise ValueError(f"its metadata lists {len(metas)} samples, not {samples}")
    return metas


def check_where(where: Where | None) -> dict[str, frozenset[str]] | None:
    """``where`` with each key's accepted values as a set of text; None or empty: no filter."""
    if not where:
        return None
    if not isinstance(where, Mapping):
        raise ValueError(f"where must map a metadata key to the values accepted, got {where!r}")
    checked = {}
    for key, values in where.items():
        if isinstance(values, str):
            values = [values]
        if not key or not values:
            raise ValueError(f"where needs a key and at least one value, got {key!r}: {values!r}")
        checked[str(key)] = frozenset(as_text(value) for value in values)
    return checked


def parse_where(items: Sequence[str]) -> dict[str, frozenset[str]] | None:
    """``KEY=VALUE`` items (a key given twice accepts either value) as a ``where``."""
    where: dict[str, set[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where takes KEY=VALUE (a metadata field and a value), got {item!r}")
        where.setdefault(key, set()).add(value)
    return check_where(where)


def describe_where(where: Mapping[str, Collection[str]]) -> str:
    return "; ".join(f"{key} in {sorted(values)}" for key, values in where.items())


def matches(meta: Mapping[str, Any], where: Mapping[str, frozenset[str]]) -> bool:
    return all(key in meta and as_text(meta[key]) in accepted for key, accepted in where.items())


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
