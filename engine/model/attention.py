"""Packed attention: causal attention within each segment of one concatenated row.

Two transformers attention functions, registered under names of their own, run a packed
step (engine/core/runner.py switches the backbone to one of them for the forward):

- ``varlen`` reads the segment boundaries from ``cu_seq_lens_q`` (the flash-attention keyword,
  which the families pass through untouched): torch's flash varlen kernel on CUDA in half
  precision where torch has its form with window and GQA (2.13), else sdpa per segment;
- ``flex`` runs FlexAttention with a document block mask built from the segment ids
  (``forvalue_segments``): causal within a segment, the layer's sliding window, grouped-query
  heads. Compiled on CUDA; eager elsewhere, where it materialises the ``N x N`` scores
  (correct, for tests and the probe, but no faster than the sdpa loop on a CPU).

Neither is registered as a mask function, so transformers builds no mask at all. Each refuses
(PackingUnsupported) what it cannot honour exactly, so that the runner's capability probe
falls back to padded sub-batches instead of computing something else.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

VARLEN_ATTENTION = "forvalue_varlen"
FLEX_ATTENTION = "forvalue_flex"

# Keyword arguments the families hand to their attention function that carry nothing the
# per-segment computation must honour (positions are already applied by the rotary layer).
_HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "cache", "past_key_values",
                              "cache_position", "output_attentions", "cu_seq_lens_k",
                              "max_length_q", "max_length_k", "position_embeddings"})
# Compiled FlexAttention: CUDA only, in the dtypes of its Triton templates. On a CPU (torch
# 2.13) inductor's C++ template takes no float64, and with dynamic shapes it fails to compile
# (CppCompileError) for some orders of sliding-window and plain masks; static shapes would
# recompile for every packed length.
_COMPILED_FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Compiled FlexAttention finds no kernel for short rows at some head layouts (torch 2.11 on an
# H200: 32 query and 8 key-value heads of 128 failed at 40 tokens and ran at 200, 3000 and
# 3900; 12/2 and 9/3 heads ran at all four; bench/results/gpu-2026-11-30/): a row shorter than
# this is padded to it for the attention, the pads forming a segment of their own.
FLEX_MIN_ROW = 256


class PackingUnsupported(RuntimeError):
    """The family cannot run packed (found by the capability check, or forced by the caller)."""


@dataclass
class PackedSegments:
    """The segments of one packed row, on the device: ``bounds`` (int32 cumulative lengths,
    ``n + 1``), ``ids`` (the segment of each of the ``N`` tokens) and the longest length.
    Flex block masks are built on first use, one per sliding window, over ``flex_rows`` tokens
    (``N`` raised to ``FLEX_MIN_ROW``), and shared by the layers of one forward."""

    bounds: torch.Tensor
    ids: torch.Tensor
    longest: int
    _block_masks: dict[int | None, BlockMask] = field(default_factory=dict, repr=False)

    @property
    def flex_rows(self) -> int:
        return max(self.ids.shape[0], FLEX_MIN_ROW)

    def block_mask(self, window: int | None, compiled: bool) -> BlockMask:
        if window not in self._block_masks:
            build = _compiled(create_block_mask) if compiled else create_block_mask
            n, pads = self.flex_rows, self.flex_rows - self.ids.shape[0]
            ids = torch.cat([self.ids, self.ids.new_full((pads,), -1)]) if pads else self.ids
            self._block_masks[window] = build(_document_mask(ids, window), None, None, n, n,
                                              device=self.ids.device)
        return self._block_masks[window]


def packed_kwargs(mode: str, segments: PackedSegments) -> dict[str, Any]:
    """The backbone's keyword arguments that carry the segments to the ``mode`` function."""
    if mode == "flex":
        return {"forvalue_segments": segments}
    bounds, longest = segments.bounds, segments.longest
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest,
            "max_length_k": longest}


def register(mode: str) -> str:
    """Register the ``mode`` ("varlen" or "flex") function with transformers; its name."""
    from transformers import AttentionInterface

    name, function = {"varlen": (VARLEN_ATTENTION, varlen_attention),
                      "flex": (FLEX_ATTENTION, flex_packed_attention)}[mode]
    AttentionInterface.register(name, function)
    return name


# ---------------------------------------------------------------- varlen


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                     scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, softcap: float | None = None,
                     is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of a packed row ``(1, heads, N, head_dim)``."""
    if cu_seq_lens_q is None:
        raise PackingUnsupported("the segment boundaries do not reach the attention function")
    _check_packed_call(module, attention_mask, dropout, softcap, is_causal, kwargs)
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
    # A host copy of the boundaries: a device synchronisation per layer on CUDA, where auto
    # never takes this loop (it is launch-bound there; flex or buckets instead).
    for start, end in itertools.pairwise(cu_seq_lens_q.tolist()):
        window = _window_mask(end - start, sliding_window, query.device)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            attn_mask=window, is_causal=window is None, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def _flash_varlen(query: torch.Tensor) -> Any:
    """torch's flash varlen attention for this query (CUDA, half precision), or None."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    return _torch_varlen_attn()


def has_flash_varlen(tensor: torch.Tensor) -> bool:
    """Whether varlen runs torch's flash kernel for tensors of this device and dtype."""
    return _flash_varlen(tensor) is not None


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


# ---------------------------------------------------------------- flex


def flex_packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                          scaling: float | None = None, dropout: float = 0.0,
                          sliding_window: int | None = None, softcap: float | None = None,
                          is_causal: bool | None = None,
                          forvalue_segments: PackedSegments | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """FlexAttention over a packed row ``(1, heads, N, head_dim)`` with a document block mask."""
    if forvalue_segments is None:
        raise PackingUnsupported("the segment ids do not reach the attention function")
    _check_packed_call(module, attention_mask, dropout, softcap, is_causal, kwargs)
    compiled = flex_is_compiled(query)
    flex = _compiled(flex_attention) if compiled else flex_attention
    n, pads = query.shape[2], forvalue_segments.flex_rows - query.shape[2]
    if pads:
        query, key, value = (F.pad(t, (0, 0, 0, pads)) for t in (query, key, value))
    out = flex(query, key, value, block_mask=forvalue_segments.block_mask(sliding_window, compiled),
               scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :n].transpose(1, 2).contiguous(), None


def flex_is_compiled(tensor: torch.Tensor) -> bool:
    """Whether flex runs compiled for tensors of this device and dtype (else eagerly)."""
    return tensor.is_cuda and tensor.dtype in _COMPILED_FLEX_DTYPES


def _document_mask(segment: torch.Tensor, window: int | None) -> Callable[..., torch.Tensor]:
    """FlexAttention's mask_mod: same segment, causal, and within the sliding window (query q
    sees keys q - window < k <= q) when there is one."""
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        allowed = (segment[q] == segment[k]) & (k <= q)
        return allowed if window is None else allowed & (q - k < window)

    return mask_mod


@functools.cache
def _compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    # dynamic=True: the packed length changes every step, and one graph serves every length.
    return torch.compile(function, dynamic=True)


# ---------------------------------------------------------------- refusals


def _check_packed_call(module: torch.nn.Module, attention_mask: torch.Tensor | None, dropout: float,
                       softcap: float | None, is_causal: bool | None, kwargs: dict[str, Any]) -> None:
    if attention_mask is not None:
        raise PackingUnsupported("the family builds an attention mask of its own")
    causal = is_causal is not False and getattr(module, "is_causal", True) is not False
    if softcap or dropout or not causal:
        raise PackingUnsupported("attention softcapping, dropout or non-causal attention")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS_KWARGS)
    if unknown:
        raise PackingUnsupported(f"unknown attention arguments {unknown}")
