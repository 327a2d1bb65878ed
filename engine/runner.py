"""The model runner: a resident model, one forward pass per scheduled step, label states out.

A packed step runs as one ragged batch without padding and without an ``N x N`` mask, in one
of two ways chosen per model family by a capability check on a probe:

- ``varlen``: the requests are concatenated into one row, positions restart at 0 per request,
  and a registered transformers attention function runs causal attention per segment, driven
  by ``cu_seq_lens_q`` (the flash-attention keyword, which the families pass through
  untouched): torch's flash varlen kernel on CUDA in half precision, else sdpa per segment;
- ``buckets``: length-sorted padded sub-batches (right padding), for a family whose packed
  hidden states do not equal its per-sample ones (or which refuses the varlen function,
  e.g. attention logit softcapping).

A chunk step runs one chunk of a long request alone, with the model's own attention and a
``DynamicCache`` carried between chunks, positions continuing. Labels never cross request
boundaries: a request's label at position k is predicted by its own hidden state k - 1.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .model import ValuationModel
from .outputs import LabelStates, RunnerOutput
from .request import PartialStates, Request
from .samples import EncodedSample, SampleError
from .scheduler import ScheduledChunk, SchedulerOutput

ATTENTION_MODES = ("auto", "varlen", "buckets")
VARLEN_ATTENTION = "forvalue_varlen"

# Keyword arguments the families hand to their attention function that carry nothing the
# per-segment computation must honour (positions are already applied by the rotary layer).
_HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "cache", "past_key_values",
                              "cache_position", "output_attentions", "cu_seq_lens_k",
                              "max_length_q", "max_length_k", "position_embeddings"})
# Probe lengths: ragged, and one longer than a small sliding window.
_PROBE_LENGTHS = (9, 3, 14, 37)

# Forwards toggle the attention implementation of a shared config: one at a time.
_FORWARD_LOCK = threading.Lock()
_PACKING_CHECKS: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


class PackingUnsupported(RuntimeError):
    """The family cannot run packed (found by the capability check, or forced by the caller)."""


# ---------------------------------------------------------------- varlen attention


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                          scaling: float | None = None, dropout: float = 0.0,
                          sliding_window: int | None = None, softcap: float | None = None,
                          is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of a packed row ``(1, heads, N, head_dim)``.

    Raises PackingUnsupported for anything it cannot honour exactly, so that the capability
    check falls back to padded sub-batches instead of computing something else.
    """
    _check_varlen_call(attention_mask, dropout, softcap, is_causal, cu_seq_lens_q, kwargs)
    groups = query.shape[1] // key.shape[1]
    flash = _flash_varlen(query)
    if flash is not None:
        # Token-major (N, heads, head_dim); window (left, 0) sees keys q - left .. q.
        window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
        longest = kwargs.get("max_length_q") or int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
        out = flash(q, k, v, cu_seq_lens_q, cu_seq_lens_q, longest, longest, scale=scaling,
                    window_size=window, enable_gqa=groups > 1)
        return out.unsqueeze(0), None
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    bounds = cu_seq_lens_q.tolist()
    for start, end in itertools.pairwise(bounds):
        window = _window_mask(end - start, sliding_window, query.device)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            attn_mask=window, is_causal=window is None, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def _check_varlen_call(attention_mask: torch.Tensor | None, dropout: float, softcap: float | None,
                       is_causal: bool | None, cu_seq_lens_q: torch.Tensor | None,
                       kwargs: dict[str, Any]) -> None:
    if cu_seq_lens_q is None:
        raise PackingUnsupported("the segment boundaries do not reach the attention function")
    if attention_mask is not None:
        raise PackingUnsupported("the family builds an attention mask of its own")
    if softcap or dropout or is_causal is False:
        raise PackingUnsupported("attention softcapping, dropout or non-causal attention")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS_KWARGS)
    if unknown:
        raise PackingUnsupported(f"unknown attention arguments {unknown}")


def _flash_varlen(query: torch.Tensor) -> Any:
    """torch's flash varlen attention for this query (CUDA, half precision), or None."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    return _torch_varlen_attn()


@functools.cache
def _torch_varlen_attn() -> Any:
    """``torch.nn.attention.varlen.varlen_attn`` in its form with GQA, scale and window
    (torch 2.13 has it; older forms lack them), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    wanted = {"scale", "window_size", "enable_gqa"}
    return varlen_attn if wanted <= inspect.signature(varlen_attn).parameters.keys() else None


def _window_mask(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal mask with a sliding window (query q sees keys q - window < k <= q), only when the
    segment is longer than the window; None means plain causal."""
    if sliding_window is None or length <= sliding_window:
        return None
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    return (k <= q) & (k > q - sliding_window)


def _register_varlen_attention() -> None:
    from transformers import AttentionInterface

    # Not registered as a mask function on purpose: transformers then builds no mask at all.
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


@contextmanager
def _attention_implementation(backbone: torch.nn.Module, name: str) -> Iterator[None]:
    config = backbone.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# ---------------------------------------------------------------- capability check


def packing_unsupported_reason(model: ValuationModel) -> str | None:
    """None when packed varlen hidden states equal per-sample ones on a probe for this model
    (checked once per backbone); otherwise why not."""
    backbone = model.backbone
    if backbone not in _PACKING_CHECKS:
        _PACKING_CHECKS[backbone] = _probe_packing(model)
    return _PACKING_CHECKS[backbone]


@torch.inference_mode()
def _probe_packing(model: ValuationModel) -> str | None:
    limit = model.context_length or max(_PROBE_LENGTHS)
    lengths = [min(length, limit) for length in _PROBE_LENGTHS]
    generator = torch.Generator().manual_seed(0)
    vocab = model.backbone.get_input_embeddings().num_embeddings
    samples = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    expected = torch.cat([_forward_single(model, ids) for ids in samples])
    try:
        packed = _forward_varlen(model, samples)
    except RuntimeError as error:  # PackingUnsupported, or a kernel refusing these shapes
        return str(error)
    # A leak across segments or a wrong window moves states by ~1e-2 or more; the tolerance
    # only absorbs rounding (eager attention takes its softmax in float32 even for float64).
    tolerance = {torch.float64: 1e-6, torch.float32: 1e-4}.get(model.dtype, 3e-2)
    error = float((packed.float() - expected.float()).abs().max()) / max(1.0, float(expected.abs().max()))
    if not error <= tolerance:
        return f"packed hidden states differ from per-sample ones (relative error {error:.1e})"
    return None


def _choose_attention(model: ValuationModel, requested: str) -> tuple[str, str | None]:
    """The attention mode, and why varlen was not taken (None when it was)."""
    if requested == "buckets":
        return "buckets", "buckets requested"
    reason = packing_unsupported_reason(model)
    if requested == "varlen":
        if reason is not None:
            raise PackingUnsupported(f"{model.name}: {reason}")
        return "varlen", None
    if reason is not None:
        return "buckets", reason
    if model.device.type == "cuda" and _flash_varlen(model.head_weight) is None:
        # Measured on an H200 (smollm2-135m shapes, bf16): a Python loop of per-segment sdpa is
        # launch-bound there, 106k tokens/s against 143k for length-bucketed padded batches.
        return "buckets", "no flash varlen kernel in this torch: per-segment sdpa is slower on CUDA"
    return "varlen", None


# ---------------------------------------------------------------- forwards


def _forward_single(model: ValuationModel, ids: list[int]) -> torch.Tensor:
    with _FORWARD_LOCK:
        out = model.backbone(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    return out.last_hidden_state[0]


def _forward_varlen(model: ValuationModel, samples: Sequence[Sequence[int]]) -> torch.Tensor:
    """Hidden states of the concatenated samples, ``(sum of lengths, d)``."""
    lengths = [len(ids) for ids in samples]
    device = model.device
    ids = torch.tensor([[token for sample in samples for token in sample]], device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    bounds = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    _register_varlen_attention()
    with _FORWARD_LOCK, _attention_implementation(model.backbone, VARLEN_ATTENTION):
        out = model.backbone(input_ids=ids, position_ids=positions, use_cache=False,
                             cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                             max_length_q=max(lengths), max_length_k=max(lengths))
    return out.last_hidden_state[0]


def right_padded(samples: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(batch, longest)`` padded on the right with 0, and the attention mask."""
    longest = max(len(ids) for ids in samples)
    ids = torch.zeros((len(samples), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = torch.tensor(sample)
        mask[row, :len(sample)] = 1
    return ids, mask


def _forward_padded(model: ValuationModel, samples: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(batch, longest, d)``; right padding, so real tokens never attend to the pads."""
    ids, mask = right_padded(samples)
    with _FORWARD_LOCK:
        return model.hidden_states(ids, mask)


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices, longest first, so that ``len(batch) * longest <= batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


# ---------------------------------------------------------------- the runner


class ModelRunner:
    """Runs scheduled steps on a resident model and values label states with the kernels.

    ``attention``: "auto" (varlen when the capability check passes, else buckets), or force
    "varlen" / "buckets". ``batch_tokens`` bounds the padded size of a bucket.
    """

    def __init__(self, model: ValuationModel, *, attention: str = "auto", batch_tokens: int = 4096) -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.model = model
        self.batch_tokens = batch_tokens
        self.attention, self.why_not_varlen = _choose_attention(model, attention)
        self.vocab_size = model.backbone.get_input_embeddings().num_embeddings
        parameters = inspect.signature(model.backbone.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"

    def check_sample(self, sample: EncodedSample, index: int | None = None) -> None:
        """Raise SampleError for a sample the model cannot run (ids outside its embedding table)."""
        largest = max(sample.input_ids)
        if largest >= self.vocab_size:
            raise SampleError(f"token id {largest} is outside the model's vocabulary ({self.vocab_size})",
                              sample_id=sample.id, where=sample.where, index=index)

    # ------------------------------------------------------------ forward

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        """Run one step: the requests it completed, with their label states, and those it
        failed (non-finite hidden states); a chunk that is not the last gives neither."""
        result = RunnerOutput()
        if not output.chunks:
            return result
        if output.is_chunk_step:
            self._run_chunk(output.chunks[0], result)
            return result
        samples = [chunk.request.sample.input_ids for chunk in output.chunks]
        for chunk, hidden in zip(output.chunks, self._forward_packed(samples), strict=True):
            chunk.request.partial_states.append(_gather(chunk.request.sample, hidden, offset=0))
            self._finish(chunk.request, result)
        return result

    def _forward_packed(self, samples: list[Sequence[int]]) -> list[torch.Tensor]:
        """Per-sample hidden states ``(length, d)`` of whole samples."""
        lengths = [len(ids) for ids in samples]
        if self.attention == "varlen":
            return list(_forward_varlen(self.model, samples).split(lengths))
        hidden: list[torch.Tensor | None] = [None] * len(samples)
        for bucket in length_batches(lengths, self.batch_tokens):
            padded = _forward_padded(self.model, [samples[i] for i in bucket])
            for row, i in enumerate(bucket):
                hidden[i] = padded[row, :lengths[i]]
                if len(bucket) > 1 and not torch.isfinite(hidden[i]).all():
                    # Fully masked pad rows can give NaN that reaches real rows through
                    # 0 * NaN (Gemma2 eager attention, float64, sliding window): run it alone.
                    hidden[i] = _forward_padded(self.model, [samples[i]])[0]
        return hidden

    def _run_chunk(self, chunk: ScheduledChunk, result: RunnerOutput) -> None:
        request = chunk.request
        if request.kv_cache is None:
            from transformers import DynamicCache

            request.kv_cache = DynamicCache(config=self.model.backbone.config)
        device = self.model.device
        ids = torch.tensor([request.sample.input_ids[chunk.start:chunk.end]], device=device)
        positions = torch.arange(chunk.start, chunk.end, device=device).unsqueeze(0)
        with _FORWARD_LOCK:
            out = self.model.backbone(input_ids=ids, position_ids=positions, use_cache=True,
                                      **{self._cache_keyword: request.kv_cache})
        partial = _gather(request.sample, out.last_hidden_state[0], offset=chunk.start)
        request.partial_states.append(partial)
        if not torch.isfinite(partial.hidden).all() or chunk.is_last:
            self._finish(request, result)

    def _finish(self, request: Request, result: RunnerOutput) -> None:
        parts = request.partial_states
        hidden = torch.cat([part.hidden for part in parts])
        sample = request.sample
        if not torch.isfinite(hidden).all():
            result.failed.append((request, SampleError(
                "the model produced non-finite hidden states (NaN or inf) for this sample",
                sample_id=sample.id, where=sample.where, index=request.index)))
            return
        labels = torch.cat([part.labels for part in parts])
        positions = [k for part in parts for k in part.positions]
        result.finished.append((request, LabelStates(request.index, sample, hidden, labels, positions)))


def _gather(sample: EncodedSample, hidden: torch.Tensor, offset: int) -> PartialStates:
    """The labels predicted inside ``hidden`` (the states of tokens ``offset .. offset + n - 1``):
    label k is predicted by token k - 1, so labels ``offset + 1 .. offset + n`` belong here."""
    last = min(offset + hidden.shape[0], len(sample.input_ids) - 1)
    positions = [k for k in range(offset + 1, last + 1) if sample.label_mask[k]]
    predicting = torch.tensor([k - 1 - offset for k in positions], dtype=torch.long, device=hidden.device)
    labels = torch.tensor([sample.input_ids[k] for k in positions], dtype=torch.long, device=hidden.device)
    return PartialStates(hidden[predicting], labels, positions)
