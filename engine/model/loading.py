"""Load a causal LM for valuation: a backbone giving final hidden states, and its LM head.

The head (weight, bias) and the logit transform (scale, final softcap) are read from the
model and checked on a probe input against the model's own logits, so that every value is
computed with exactly the logits the model would produce. An image-text model comes with its
processor (engine/inputs/vision.py); its backbone is the language model with the vision tower and
projector, and its probe holds an image.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from forvalue.kernels import LogitTransform

from ..version import __version__
from .embedded import EMBEDDED_MODELS, embedded_path

if TYPE_CHECKING:
    from ..inputs.images import ImageLimits
    from ..inputs.vision import ImageInputs, Vision
    from .skip import SkipStates
    from .vllm_backbone import VllmBackbone, VllmOptions

BACKBONES = ("hf", "vllm")  # who computes the hidden states: transformers here, or a vLLM engine


class ModelError(ValueError):
    """The model cannot be loaded or valued exactly (a user-facing error)."""


@dataclass
class ValuationModel:
    """A resident model: ``hidden_states`` runs the backbone only; the head is kept apart.
    With the vLLM backbone, ``vllm`` computes the states and ``backbone`` is None."""

    name: str
    backbone: torch.nn.Module | None
    head_weight: torch.Tensor
    transform: LogitTransform  # bias, logit scale, final softcap: the kernels' keyword arguments
    tokenizer: Any | None
    context_length: int | None
    identity: dict[str, str] = field(default_factory=dict)
    causal_lm: torch.nn.Module | None = None  # the whole model (LoRA warm-up), never run to value
    vision: Vision | None = None  # an image-text model's processor and image tokens
    skip: SkipStates | None = None  # the skip readout's states beside the final ones (engine/model/skip.py)
    derived: dict[Any, ValuationModel] = field(default_factory=dict, repr=False, compare=False)
    vllm: VllmBackbone | None = None  # engine/model/vllm_backbone.py

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.head_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.head_weight.shape[1]


    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      images: ImageInputs | None = None) -> torch.Tensor:
        """Final (post-norm) hidden states, ``(batch, length, d)``; the LM head never runs.
        ``images``: one sample's image inputs."""
        return self.backbone_states(input_ids=input_ids.to(self.device),
                                    attention_mask=attention_mask.to(self.device), use_cache=False,
                                    **self.image_inputs(images))

    def backbone_states(self, **inputs: Any) -> torch.Tensor:
        """The states the head reads, ``(batch, length, d)``, from one backbone call: its last
        hidden states, with the skip readout's beside them (``2d``) when the model has one."""
        if self.skip is None:
            return self.backbone(**inputs).last_hidden_state
        with self.skip.capture() as skip_states:
            final = self.backbone(**inputs).last_hidden_state
            return torch.cat([final, skip_states().to(final.dtype)], dim=-1)

    def image_inputs(self, images: ImageInputs | None) -> dict[str, torch.Tensor]:
        """A sample's image inputs as keyword arguments: on the device, pixels in the model's dtype."""
        if images is None:
            return {}
        return {key: value.to(self.device, self.dtype if value.is_floating_point() else value.dtype)
                for key, value in images.tensors.items()}

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Transformed logits ``f(W h + b)`` of a few hidden states, ``T x V`` (for probe checks
        and autograd references only; valuation never builds them). ``weight`` replaces the
        head, e.g. by a copy that requires grad; the result has its dtype."""
        weight = self.head_weight if weight is None else weight
        z = hidden.to(weight.dtype) @ weight.T
        if self.transform.bias is not None:
            z = z + self.transform.bias.to(z.dtype)
        return self.transform.apply(z)[0]

    def close(self) -> None:
        """Stop what the model started outside this process (a vLLM engine's processes); a
        long-running owner calls it before it exits, rather than leaving it to exit-time
        finalizers. Idempotent; a no-op for a Hugging Face backbone."""
        if self.vllm is not None:
            self.vllm.close()


def load_model(model: str | os.PathLike | torch.nn.Module = "smollm2-135m", *,
               tokenizer: Any | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, adapter: str | None = None,
               processor: Any | None = None, image_limits: ImageLimits | None = None,
               backbone: str = "hf", vllm_options: VllmOptions | None = None) -> ValuationModel:
    """Load the embedded default, a local Hugging Face causal LM or image-text model (path
    or cached id), or wrap a model object already built. Float32 on CPU and bfloat16 on CUDA
    by default.

    ``backbone="vllm"``: a vLLM engine computes the hidden states (``vllm_options``, engine/
    model/vllm_backbone.py); the head and the probe checks come from a Hugging Face load of the
    same folder on the host, dropped once checked. Text models only, no adapter.

    ``adapter``: a local PEFT (LoRA) adapter folder; it is merged into the weights, so values
    are those of the adapted model. ``processor``: an image-text model's processor (a folder
    brings its own); its tokenizer is the model's. ``image_limits``: the largest image a
    sample may hold (engine/inputs/images.py, ImageLimits)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype, device)
    if backbone not in BACKBONES:
        raise ModelError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if backbone == "vllm":
        return _load_with_vllm(model, tokenizer, device, dtype, adapter, processor, vllm_options)
    if isinstance(model, torch.nn.Module):
        name, hf_model = type(model).__name__, model.to(device=device, dtype=dtype)
    else:
        name = str(model)
        path = embedded_path(name) if name in EMBEDDED_MODELS else name
        hf_model, loaded_tokenizer, loaded_processor = _load_pretrained(path, dtype)
        hf_model = hf_model.to(device)
        processor = processor if processor is not None else loaded_processor
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if adapter is not None:
        hf_model = _merge_adapter(hf_model, str(adapter))
        name = f"{name}+{adapter}"
    vision = _vision(hf_model, processor, image_limits, name)
    if vision is not None and tokenizer is None:
        tokenizer = processor.tokenizer
    return _wrap(hf_model, tokenizer, name, vision)


def _load_with_vllm(model: Any, tokenizer: Any | None, device: torch.device, dtype: torch.dtype,
                    adapter: str | None, processor: Any | None,
                    options: VllmOptions | None) -> ValuationModel:
    from .vllm_backbone import VllmOptions, VllmUnavailable, attach_vllm, import_vllm, load_checkpoint_model

    if isinstance(model, torch.nn.Module):
        raise ModelError("the vLLM backbone loads a model folder (or an embedded name), not a module object")
    if adapter is not None:
        raise ModelError("--adapter is not supported with the vLLM backbone (vLLM's LoRA does not reach its "
                         "pooling runner's states here): merge the adapter into a model folder first")
    if processor is not None:
        raise ModelError("the vLLM backbone values text models only")
    try:
        import_vllm()
    except VllmUnavailable as error:
        raise ModelError(str(error)) from None
    name, options = str(model), options or VllmOptions()
    path = embedded_path(name) if name in EMBEDDED_MODELS else name
    if options.check == "logprobs":
        return load_checkpoint_model(name, path, tokenizer, device, dtype, options)
    hf_model, loaded_tokenizer, loaded_processor = _load_pretrained(path, dtype)
    if loaded_processor is not None:
        raise ModelError(f"{name}: an image-text model; the vLLM backbone values text models only")
    checked = _wrap(hf_model, tokenizer if tokenizer is not None else loaded_tokenizer, name, None)
    return attach_vllm(checked, path, device, options)


def _merge_adapter(hf_model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError("adapters need the peft package: pip install 'forvalue[lora]'") from None
    if not (Path(adapter) / "adapter_config.json").exists():
        raise ModelError(f"{adapter!r} is not a local PEFT adapter folder (no adapter_config.json); "
                         "forvalue never downloads from a hub")
    try:
        adapted = PeftModel.from_pretrained(hf_model, adapter, is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot apply adapter {adapter!r} to this model: {exc}") from None
    return adapted.merge_and_unload()


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or float64")
    return resolved


def _load_pretrained(path: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any | None, Any | None]:
    """The model, its tokenizer and (image-text models) its processor."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {path!r}: not a local model folder nor a model in the "
                         f"local Hugging Face cache (forvalue never downloads from a hub). "
                         f"Embedded models: {', '.join(EMBEDDED_MODELS)}. ({exc})") from None
    if _is_image_text(config):
        return _load_image_text(path, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None  # pre-tokenised samples still work
    return model, tokenizer, None


def _load_image_text(path: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    except ValueError as exc:
        raise ModelError(f"{path} is an image-text model of a family transformers cannot load as "
                         f"AutoModelForImageTextToText: {exc}") from None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a processor class may need packages this install lacks (torchvision)
        raise ModelError(f"{path}: cannot load its processor ({type(exc).__name__}: {exc}); build it "
                         "yourself and pass load_model(model, processor=...)") from None
    return model, processor.tokenizer, processor


def _is_image_text(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def _vision(hf_model: torch.nn.Module, processor: Any | None, limits: ImageLimits | None,
            name: str) -> Vision | None:
    """An image-text model's Vision (its processor is required); None for a text model."""
    if not _is_image_text(hf_model.config):
        if processor is not None:
            raise ModelError(f"{name} is a text-only model; processor= is for image-text models")
        return None
    if processor is None or getattr(processor, "image_processor", None) is None:
        raise ModelError(f"{name} is an image-text model: pass its processor, "
                         "load_model(model, processor=AutoProcessor...)")
    from ..inputs.vision import Vision

    return Vision.of(processor, limits)


def _wrap(hf_model: torch.nn.Module, tokenizer: Any | None, name: str,
          vision: Vision | None) -> ValuationModel:
    config = hf_model.config.get_text_config()  # a text model's own config; a VLM's language model's
    head = hf_model.get_output_embeddings()
    backbone = getattr(hf_model, getattr(hf_model, "base_model_prefix", "model"), None)
    if head is None or backbone is None or backbone is hf_model:
        raise ModelError(f"{name}: not a causal LM with a separate backbone and output projection")
    hf_model.eval().requires_grad_(False)
    bias = None if getattr(head, "bias", None) is None else head.bias.detach()
    model = ValuationModel(
        name=name, backbone=backbone, head_weight=head.weight.detach(),
        transform=logit_transform(config, bias), tokenizer=tokenizer,
        context_length=getattr(config, "max_position_embeddings", None), causal_lm=hf_model, vision=vision)
    _check_probe(hf_model, model)
    model.identity = model_identity(model, _model_fingerprint(hf_model))
    return model


def logit_transform(config: Any, bias: torch.Tensor | None) -> LogitTransform:
    """The head's bias, then the family's logit scale and final softcap (from its text config)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(bias, _logit_scale(config), float(softcap) if softcap else None)


def _logit_scale(config: Any) -> float | None:
    """Families that multiply (Cohere ``logit_scale``) or divide (Granite ``logits_scaling``)."""
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return float(config.logit_scale)
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        return 1.0 / float(config.logits_scaling)
    return None


@torch.inference_mode()
def _check_probe(hf_model: torch.nn.Module, model: ValuationModel) -> None:
    """Refuse a family whose logits the head + transform do not reproduce (on a conversation
    with an image for an image-text model)."""
    ids, images = _probe_inputs(model)
    mask = torch.ones_like(ids)
    expected = hf_model(input_ids=ids, attention_mask=mask, use_cache=False,
                        **model.image_inputs(images)).logits[0].float()
    got = model.logits(model.hidden_states(ids, mask, images)[0], model.head_weight.float())
    if expected.shape != got.shape:
        raise ModelError(f"{model.name}: the model returns logits of shape {tuple(expected.shape)}, "
                         f"the head gives {tuple(got.shape)}; this family is not supported")
    tolerance = 1e-4 if model.dtype in (torch.float32, torch.float64) else 3e-2
    error = float((expected - got).abs().max()) / max(1.0, float(expected.abs().max()))
    if not error <= tolerance:
        raise ModelError(
            f"{model.name}: the model's logits are not reproduced from its final hidden states "
            f"and output projection (relative error {error:.2e}); this family transforms its "
            f"logits in a way forvalue does not support yet")


def _probe_inputs(model: ValuationModel) -> tuple[torch.Tensor, ImageInputs | None]:
    if model.vision is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, model.vocab_size, (1, 12), generator=gen).to(model.device), None
    from ..inputs.chat import InvalidSample

    try:
        ids, images = model.vision.probe()
    except InvalidSample as error:
        raise ModelError(f"{model.name}: its processor cannot encode a conversation with an image "
                         f"({error})") from None
    return torch.tensor([ids], device=model.device), images


def model_identity(model: ValuationModel, model_hash: str) -> dict[str, str]:
    """What a saved Reference must match: model fingerprint, sizes, transform, tokenizer (and
    an image-text model's processor)."""
    vision = {} if model.vision is None else {"processor_hash": model.vision.fingerprint()}
    return {
        **vision,
        "model_name": model.name,
        "model_hash": model_hash,
        "vocab_size": str(model.vocab_size),
        "hidden_size": str(model.hidden_size),
        "logit_transform": json.dumps({"bias": model.transform.bias is not None,
                                       "scale": model.transform.scale,
                                       "softcap": model.transform.softcap}, sort_keys=True),
        "tokenizer_hash": _tokenizer_fingerprint(model.tokenizer),
        "forvalue_version": __version__,
    }


def _model_fingerprint(hf_model: torch.nn.Module) -> str:
    # Hashing every weight of a large model takes seconds; a strided sample of every tensor
    # (plus the config) still changes with any fine-tuning, which is what must be caught.
    digest = hashlib.sha256(hf_model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(hf_model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        digest.update(name.encode())
        digest.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer: Any | None) -> str:
    if tokenizer is None:
        return "none"
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None
                  else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()[:32]


