"""Shared pieces of the Triton kernels: the optional import, interpreter mode, tile math, grids.

Every kernel computes logit tiles ``z = H W^T`` over a ``(token, vocabulary)`` tile, applies the
logit transform of ``logits.LogitTransform`` and masks columns past ``V`` to ``-inf`` after it.
Under ``TRITON_INTERPRET=1`` (read by ``triton.jit`` when a kernel is defined, so it must be set
before this package is imported) the same kernels run on CPU: dot operands are upcast to fp32
there (the interpreter's bf16 dot is wrong), tanh is built from ``exp`` (no libdevice) and one
fixed configuration is used per kernel (no autotuning).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the ops then run their torch twins only
    triton = None
    tl = None

HAVE_TRITON = triton is not None
INTERPRET = HAVE_TRITON and bool(triton.knobs.runtime.interpret)
HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, *HALF_DTYPES)
# Programs per multiprocessor the vocabulary split aims for; a few thousand tokens make fewer
# token tiles than a Hopper GPU has multiprocessors, so the vocabulary is split across programs.
_WAVES = 4
# Interpreter runs have no multiprocessors; this many "virtual" ones still exercise several splits.
_INTERPRET_SMS = 2


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns scalar tensors into ints with ``int(ndarray of shape (1,))``,
    which numpy >= 2.4 refuses: every ``range`` bound from a kernel argument then fails.
    Apply the upstream fix (triton-lang/triton#9172) for interpreter runs only."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _patch_interpreter_index()


def jit(fn: Callable) -> Callable:
    """``triton.jit`` when Triton is installed; otherwise the plain function, never launched."""
    return triton.jit(fn) if HAVE_TRITON else fn


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes (constexpr) and launch options of one kernel.

    ``gpu`` serves half-precision activations with 16-aligned rows (tiles stream through shared
    memory); ``compact`` serves fp32 activations (tf32x3 dots need more registers) or rows whose
    strides are not multiples of 16 elements (loads go through registers), where the large tiles
    spill; ``interpret`` is the single configuration of interpreter runs.
    """

    gpu: dict[str, int]
    compact: dict[str, int]
    interpret: dict[str, int]

    def pick(self, activations: torch.Tensor, *others: torch.Tensor) -> dict[str, int]:
        if INTERPRET:
            return self.interpret
        compact = activations.dtype == torch.float32 or not all(map(_aligned, (activations, *others)))
        return self.compact if compact else self.gpu


def _aligned(t: torch.Tensor) -> bool:
    rows_aligned = all(s % 16 == 0 for s in t.stride() if s != 1) and 1 in t.stride()
    return t.data_ptr() % 16 == 0 and rows_aligned


def unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these floating inputs, or ``None`` when they can."""
    if not HAVE_TRITON:
        return "triton is not installed"
    device = tensors[0].device
    if device.type != "cuda" and not INTERPRET:
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}"
    dtypes = {t.dtype for t in tensors}
    if not dtypes <= set(KERNEL_DTYPES):
        return f"Triton kernels take float32/float16/bfloat16 inputs, got {sorted(map(str, dtypes))}"
    if set(HALF_DTYPES) <= dtypes:
        return "Triton kernels cannot mix float16 and bfloat16 inputs; cast them to one dtype"
    return None


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRET_SMS


def vocab_splits(num_tokens: int, block_t: int, vocab: int, block_v: int, device: torch.device,
                 max_splits: int | None = None) -> tuple[int, int]:
    """``(splits, tiles_per_split)``: enough programs to fill the device, no split empty."""
    vocab_tiles = triton.cdiv(vocab, block_v)
    token_tiles = triton.cdiv(max(num_tokens, 1), block_t)
    wanted = triton.cdiv(_WAVES * _multiprocessors(device), token_tiles)
    if max_splits is not None:
        wanted = min(wanted, max_splits)
    tiles_per_split = triton.cdiv(vocab_tiles, max(1, min(wanted, vocab_tiles)))
    return triton.cdiv(vocab_tiles, tiles_per_split), tiles_per_split


@dataclass
class LaunchLog:
    """Launches recorded instead of run (ahead-of-time compilation in the tests)."""

    launches: list[tuple[Any, tuple, dict]] = field(default_factory=list)


_recording: LaunchLog | None = None


def record_launches(log: LaunchLog | None) -> None:
    """Record every launch into ``log`` instead of running it (``None`` runs them again)."""
    global _recording
    _recording = log


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    if _recording is not None:
        _recording.launches.append((kernel, args, meta))
    else:
        kernel[grid](*args, **meta)


def transform_args(transform: Any, W: torch.Tensor) -> tuple[tuple, dict[str, bool]]:
    """Runtime arguments ``(bias, bias stride, scale, softcap)`` and flags of a LogitTransform.

    Without a bias, ``W`` stands in as a pointer that is never read.
    """
    bias = transform.bias
    args = (W if bias is None else bias, 0 if bias is None else bias.stride(0),
            float(transform.scale or 1.0), float(transform.softcap or 1.0))
    flags = {"HAS_BIAS": bias is not None, "HAS_SCALE": transform.scale is not None,
             "HAS_SOFTCAP": transform.softcap is not None}
    return args, flags


# ---------------------------------------------------------------------------------------------
# Device functions shared by the kernels.


@jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter computes bf16 dots wrongly
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    # tf32x3 keeps fp32 operands at fp32 accuracy; half operands ignore it.
    return tl.dot(a, b, acc, input_precision="tf32x3")


@jit
def mma(a, b, acc, INTERPRET: tl.constexpr):
    """``acc + a @ b`` in fp32.

    An fp32 operand meeting a half one is split into two halves, ``hi + lo``, so the product
    keeps ~16 mantissa bits of it instead of the 8 (bf16) a plain cast would leave.
    """
    if a.dtype == tl.float32 and b.dtype != tl.float32:
        hi = a.to(b.dtype)
        acc = _dot(hi, b, acc, INTERPRET)
        a = (a - hi.to(tl.float32)).to(b.dtype)
    elif b.dtype == tl.float32 and a.dtype != tl.float32:
        hi = b.to(a.dtype)
        acc = _dot(a, hi, acc, INTERPRET)
        b = (b - hi.to(tl.float32)).to(a.dtype)
    return _dot(a, b, acc, INTERPRET)


def split_halves(G: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 matrix as two contiguous ones of ``dtype`` with the same strides: ``hi = G``
    rounded and ``lo = G - hi`` rounded, so that ``hi + lo`` keeps ~16 mantissa bits of ``G``
    (the ``E + E_lo`` of error_tiles.py, for an operand that comes in fp32).

    Splitting once per call, rather than per tile inside the kernel, lets the kernel stream
    both halves through the tensor cores from memory with the half-precision tiles."""
    hi, lo = torch.empty((2, *G.shape), dtype=dtype, device=G.device)
    hi.copy_(G)
    torch.sub(G, hi, out=lo)
    return hi, lo


@jit
def tanh(x):
    # From exp (no libdevice in the interpreter); exp of a non-positive argument cannot overflow.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@jit
def project_tile(H, W, G, G_lo, rows, cols, T, V, D, stride_ht, stride_hd, stride_wv, stride_wd,
                 stride_gv, stride_gd, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr, WITH_G: tl.constexpr, SPLIT_G: tl.constexpr,
                 EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    """``z = H[rows] W[cols]^T`` and, with ``WITH_G``, ``H[rows] G[cols]^T`` from the same H loads.

    With ``SPLIT_G``, ``G`` and ``G_lo`` (same strides) are the two half-precision halves of an
    fp32 matrix (``split_halves``); both go through the tensor cores.
    Rows past ``T`` and columns past ``V`` load zeros; the callers mask them.
    """
    row_ok = rows < T
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = H + rows.to(tl.int64)[:, None] * stride_ht + ks[None, :] * stride_hd
    w_ptrs = W + cols.to(tl.int64)[None, :] * stride_wv + ks[:, None] * stride_wd
    g_offs = cols.to(tl.int64)[None, :] * stride_gv + ks[:, None] * stride_gd
    z = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    gz = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        if EVEN_K:
            h_mask = row_ok[:, None]
            w_mask = col_ok[None, :]
        else:
            h_mask = row_ok[:, None] & (ks[None, :] + k < D)
            w_mask = col_ok[None, :] & (ks[:, None] + k < D)
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)
        z = mma(h, tl.load(w_ptrs, mask=w_mask, other=0.0), z, INTERPRET)
        if WITH_G:
            gz = mma(h, tl.load(G + g_offs, mask=w_mask, other=0.0), gz, INTERPRET)
            if SPLIT_G:
                gz = mma(h, tl.load(G_lo + g_offs, mask=w_mask, other=0.0), gz, INTERPRET)
        h_ptrs += BLOCK_K * stride_hd
        w_ptrs += BLOCK_K * stride_wd
        g_offs += BLOCK_K * stride_gd
    return z, gz


@jit
def logit_transform(z, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(l, f'(z))``: the logit scale, then the final softcap, as ``LogitTransform.apply``."""
    slope = tl.full(z.shape, 1.0, tl.float32)
    if HAS_SCALE:
        z = z * scale
        slope = slope * scale
    if HAS_SOFTCAP:
        t = tanh(z / softcap)
        z = t * softcap
        slope = slope * (1.0 - t * t)
    return z, slope


@jit
def transform_tile(z, cols, V, bias, stride_b, scale, softcap, HAS_BIAS: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(l, f'(z))`` of a logit tile; columns past ``V`` get ``l = -inf`` after the transform,
    so that no softcap can turn them finite again."""
    col_ok = cols < V
    if HAS_BIAS:
        z += tl.load(bias + cols.to(tl.int64) * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    l, slope = logit_transform(z, scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    return tl.where(col_ok[None, :], l, float("-inf")), slope


@jit
def transform_labels(z, labels, bias, stride_b, scale, softcap, HAS_BIAS: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(l, f'(z))`` of each token's label logit, ``z`` of shape ``(BLOCK_T,)``."""
    if HAS_BIAS:
        z += tl.load(bias + labels.to(tl.int64) * stride_b).to(tl.float32)
    return logit_transform(z, scale, softcap, HAS_SCALE, HAS_SOFTCAP)


@jit
def online_softmax_step(m, total, l):
    """Fold a logit tile into the running ``(max, sum exp)``; also return the rescale factor of
    the old state and the tile's ``exp(l - new max)``."""
    new_m = tl.maximum(m, tl.max(l, axis=1))
    alpha = tl.exp(m - new_m)
    p = tl.exp(l - new_m[:, None])
    return new_m, total * alpha + tl.sum(p, axis=1), alpha, p


@jit
def merge_split(m, total, part_m, part_total):
    """Merge one split's ``(max, sum)`` into the running pair; return the two rescale factors."""
    new_m = tl.maximum(m, part_m)
    alpha = tl.exp(m - new_m)
    beta = tl.exp(part_m - new_m)
    return new_m, total * alpha + part_total * beta, alpha, beta


@jit
def label_rows_dot(H, W, rows, labels, row_ok, D, stride_ht, stride_hd, stride_wv, stride_wd,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``h_t . W[y_t]`` per token, fp32, from the label rows alone."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = H + rows.to(tl.int64)[:, None] * stride_ht + ks[None, :] * stride_hd
    w_ptrs = W + labels.to(tl.int64)[:, None] * stride_wv + ks[None, :] * stride_wd
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        mask = row_ok[:, None] & (ks[None, :] + k < D)
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += h * tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        h_ptrs += BLOCK_K * stride_hd
        w_ptrs += BLOCK_K * stride_wd
    return tl.sum(acc, axis=1)
