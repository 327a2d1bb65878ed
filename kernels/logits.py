"""Shared pieces of the torch twins: input checks, the logit transform and vocabulary chunks.

Every op walks the vocabulary in chunks of columns so that at most a ``T x chunk`` block of
logits exists at a time; the chunk width comes from a memory budget, never from ``V``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

_DEFAULT_BUDGET_BYTES = 128 * 2**20
_budget_bytes = _DEFAULT_BUDGET_BYTES
# T x chunk temporaries alive at once in the widest op (logits, probabilities, error, product).
_LIVE_BLOCKS = 6
_CHUNK_ALIGN = 128


def set_memory_budget(num_bytes: int | None) -> None:
    """Bound the ``T x chunk`` temporaries of the torch ops (``None`` restores 128 MiB)."""
    global _budget_bytes
    if num_bytes is not None and num_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {num_bytes}")
    _budget_bytes = _DEFAULT_BUDGET_BYTES if num_bytes is None else int(num_bytes)


def memory_budget() -> int:
    return _budget_bytes


def chunk_width(num_tokens: int, vocab: int, element_bytes: int) -> int:
    """Vocabulary columns per chunk so that the live temporaries fit the budget."""
    per_column = max(num_tokens, 1) * element_bytes * _LIVE_BLOCKS
    width = _budget_bytes // per_column
    width = max(_CHUNK_ALIGN, width // _CHUNK_ALIGN * _CHUNK_ALIGN)
    return min(width, vocab)


@dataclass(frozen=True)
class LogitTransform:
    """``l = f(z)``: optional bias, then a logit scale ``s``, then a final softcap ``c``."""

    bias: torch.Tensor | None = None
    scale: float | None = None
    softcap: float | None = None

    def kwargs(self) -> dict[str, torch.Tensor | float | None]:
        """``bias``, ``scale`` and ``softcap``: the keyword arguments every op takes."""
        return {"bias": self.bias, "scale": self.scale, "softcap": self.softcap}

    def apply(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Return ``(l, f'(z))``; ``f'`` is a float when it does not depend on ``z``."""
        slope: torch.Tensor | float = 1.0
        if self.scale is not None:
            z = z * self.scale
            slope = float(self.scale)
        if self.softcap is not None:
            t = torch.tanh(z / self.softcap)
            z = t * self.softcap
            slope = slope * (1.0 - t * t)
        return z, slope


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for half types, fp64 stays fp64 (the tests' exact mode)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_inputs(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor | None,
                 bias: torch.Tensor | None, scale: float | None, softcap: float | None) -> None:
    """Raise a ValueError naming the argument that does not fit (shapes, devices, ranges)."""
    if H.dim() != 2 or W.dim() != 2:
        raise ValueError(f"H and W must be 2-D, got {tuple(H.shape)} and {tuple(W.shape)}")
    if H.shape[1] != W.shape[1]:
        raise ValueError(f"hidden size mismatch: H has d={H.shape[1]}, W has d={W.shape[1]}")
    if not H.is_floating_point() or not W.is_floating_point():
        raise ValueError("H and W must be floating point")
    if H.device != W.device:
        raise ValueError(f"H is on {H.device} but W is on {W.device}")
    if labels is not None:
        if labels.shape != (H.shape[0],):
            raise ValueError(f"labels must have shape ({H.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be int32 or int64, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= W.shape[0]):
            raise ValueError(f"labels must lie in [0, {W.shape[0]}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    if bias is not None and bias.shape != (W.shape[0],):
        raise ValueError(f"bias must have shape ({W.shape[0]},), got {tuple(bias.shape)}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


@dataclass(frozen=True)
class VocabChunk:
    start: int
    stop: int
    logits: torch.Tensor  # (T, stop - start), transformed
    slope: torch.Tensor | float  # f'(z) on the chunk


def vocab_chunks(H: torch.Tensor, W: torch.Tensor, transform: LogitTransform,
                 dtype: torch.dtype) -> Iterator[VocabChunk]:
    """Yield the transformed logits of ``H`` one budget-sized block of vocabulary at a time."""
    Hc = H.to(dtype)
    V = W.shape[0]
    width = chunk_width(H.shape[0], V, torch.finfo(dtype).bits // 8)
    for start in range(0, V, width):
        stop = min(start + width, V)
        z = Hc @ W[start:stop].to(dtype).T
        if transform.bias is not None:
            z += transform.bias[start:stop].to(dtype)
        logits, slope = transform.apply(z)
        yield VocabChunk(start, stop, logits, slope)


def logit_chunks(H: torch.Tensor, W: torch.Tensor, *, bias: torch.Tensor | None = None,
                 scale: float | None = None, softcap: float | None = None) -> Iterator[VocabChunk]:
    """The transformed logits ``f(H W^T + bias)``, one memory-budget block of vocabulary columns
    at a time, in fp32 (fp64 for fp64 inputs); a chunk's ``logits`` are the caller's to modify."""
    check_inputs(H, W, None, bias, scale, softcap)
    return vocab_chunks(H, W, LogitTransform(bias, scale, softcap), compute_dtype(H, W))


def label_terms(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, transform: LogitTransform,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Transformed logit and slope of each token's label, from the label rows of ``W`` alone."""
    z = (H.to(dtype) * W[labels].to(dtype)).sum(dim=1)
    if transform.bias is not None:
        z = z + transform.bias[labels].to(dtype)
    return transform.apply(z)


def chunk_error(chunk: VocabChunk, labels: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``e = (onehot(y) - p) * f'(z)`` on the chunk's columns, ``(T, width)``."""
    error = chunk.logits.sub_(lse[:, None]).exp_().neg_()  # consumes the logits
    inside = (labels >= chunk.start) & (labels < chunk.stop)
    rows = inside.nonzero().squeeze(1)
    error[rows, labels[rows] - chunk.start] += 1.0
    return error.mul_(chunk.slope)


class OnlineSoftmax:
    """Running max and sum of ``exp(l)`` over vocabulary chunks, with weighted values.

    ``acc`` accumulates ``sum_v exp(l_v - m) f'_v value_v`` so that, at the end,
    ``acc / total`` is the softmax expectation of ``f' * value``.
    """

    def __init__(self, num_tokens: int, value_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max = torch.full((num_tokens,), float("-inf"), dtype=dtype, device=device)
        self.total = torch.zeros(num_tokens, dtype=dtype, device=device)
        self.acc = torch.zeros((num_tokens, *value_shape), dtype=dtype, device=device)

    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """Fold a chunk's logits in; return its ``exp(l - m)`` weights under the new max.

        The weights are computed in place: ``logits`` is consumed.
        """
        new_max = torch.maximum(self.max, logits.max(dim=1).values)
        rescale = torch.exp(self.max - new_max)
        weights = logits.sub_(new_max[:, None]).exp_()
        self.total = self.total * rescale + weights.sum(dim=1)
        self.acc *= rescale.view(-1, *([1] * (self.acc.dim() - 1)))
        self.max = new_max
        return weights

    def logsumexp(self) -> torch.Tensor:
        return self.max + torch.log(self.total)
