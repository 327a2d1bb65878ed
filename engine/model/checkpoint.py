"""A causal LM's head, logit transform and fingerprint read from its safetensors checkpoint,
without building the model: for a backbone that runs elsewhere (vLLM) and a model too large
to load on the host.

The head's tensor names come from the family's own module tree, built on the meta device (no
memory): the output projection's ``weight`` (and ``bias``), or the input embedding's when
the head is tied to it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

# Bytes read from each end of every tensor for the fingerprint: any fine-tuning of a tensor
# changes them, and a 100 GB checkpoint is fingerprinted in a second.
FINGERPRINT_BYTES = 4096


def checkpoint_files(path: str | Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors checkpoint files")
    return files


def _header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the offset where its tensor data starts."""
    with file.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size)), 8 + size


def head_names(config: Any) -> tuple[str, str | None]:
    """The checkpoint names of the head's weight and bias (None: no bias)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    tied = head.weight is embedding.weight
    weight = names[id(embedding if tied else head)] + ".weight"
    bias = names[id(head)] + ".bias" if getattr(head, "bias", None) is not None else None
    return weight, bias


def read_tensors(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in set(names) & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    missing = sorted(set(names) - set(found))
    if missing:
        raise KeyError(f"{path}: the checkpoint holds no tensor named {', '.join(missing)}")
    return found


def fingerprint(path: str | Path, config: Any) -> str:
    """A digest of the config and of both ends of every stored tensor."""
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode())
    for file in checkpoint_files(path):
        header, start = _header(file)
        with file.open("rb") as handle:
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = (start + offset for offset in header[name]["data_offsets"])
                digest.update(name.encode())
                for where in (begin, max(begin, end - FINGERPRINT_BYTES)):
                    handle.seek(where)
                    digest.update(handle.read(min(FINGERPRINT_BYTES, end - where)))
    return "checkpoint:" + digest.hexdigest()[:32]
