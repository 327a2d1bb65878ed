"""Prediction errors written to memory chunk by chunk, and the GEMM that consumes them: the
Triton path of ``error_outer`` (``E^T H``) and ``error_gram`` (``Ea Eb^T``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .logits import LogitTransform, memory_budget
from .triton_utils import (
    INTERPRET,
    KernelConfig,
    jit,
    launch,
    mma,
    project_tile,
    tl,
    transform_args,
    transform_tile,
    triton,
)


@jit
def error_tile_kernel(H, W, labels, weights, lse, bias, stride_b, scale, softcap, E, E_lo, T, D,
                      v_start, v_stop, stride_ht, stride_hd, stride_wv, stride_wd, stride_y,
                      stride_w, stride_et, stride_ev, HAS_BIAS: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HAS_WEIGHTS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """``e = w_t (onehot(y_t) - p_t)[v] f'_t[v]`` for ``v`` in ``[v_start, v_stop)``, from the
    finished log-sum-exp, at ``E[t, v - v_start]``.

    With ``SPLIT`` the fp32 error is stored as two halves of ``E``'s dtype, ``E + E_lo``, so that
    the GEMMs after it run on half-precision tensor cores straight from memory and still see
    ~16 mantissa bits of the error.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_start + local
    row_ok = rows < T
    z, _ = project_tile(H, W, W, W, rows, cols, T, v_stop, D, stride_ht, stride_hd, stride_wv,
                        stride_wd, stride_wv, stride_wd, BLOCK_T, BLOCK_V, BLOCK_K, False, False, EVEN_K,
                        INTERPRET)
    l, slope = transform_tile(z, cols, v_stop, bias, stride_b, scale, softcap, HAS_BIAS,
                              HAS_SCALE, HAS_SOFTCAP)
    rows64 = rows.to(tl.int64)
    y = tl.load(labels + rows64 * stride_y, mask=row_ok, other=0)
    p = tl.exp(l - tl.load(lse + rows, mask=row_ok, other=0.0)[:, None])
    error = ((cols[None, :] == y[:, None]).to(tl.float32) - p) * slope
    if HAS_WEIGHTS:
        error *= tl.load(weights + rows64 * stride_w, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    offs = rows64[:, None] * stride_et + local.to(tl.int64)[None, :] * stride_ev
    mask = row_ok[:, None] & (cols < v_stop)[None, :]
    hi = error.to(E.dtype.element_ty)
    tl.store(E + offs, hi, mask=mask)
    if SPLIT:
        tl.store(E_lo + offs, (error - hi.to(tl.float32)).to(E.dtype.element_ty), mask=mask)


@jit
def accumulate_mm_kernel(A, A_lo, B, B_lo, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                         stride_cm, stride_cn, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """``C += (A + A_lo) @ (B + B_lo)`` into fp32 ``C``, dropping the tiny ``A_lo @ B_lo``.

    The ``*_lo`` operands (same strides as their ``hi`` parts) exist only with ``*_SPLIT``.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_offs = rm.to(tl.int64)[:, None] * stride_am + ks[None, :].to(tl.int64) * stride_ak
    b_offs = ks.to(tl.int64)[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a_mask = (rm < M)[:, None] & (ks + k < K)[None, :]
        b_mask = (ks + k < K)[:, None] & (rn < N)[None, :]
        a = tl.load(A + a_offs, mask=a_mask, other=0.0)
        b = tl.load(B + b_offs, mask=b_mask, other=0.0)
        acc = mma(a, b, acc, INTERPRET)
        if A_SPLIT:
            acc = mma(tl.load(A_lo + a_offs, mask=a_mask, other=0.0), b, acc, INTERPRET)
        if B_SPLIT:
            acc = mma(a, tl.load(B_lo + b_offs, mask=b_mask, other=0.0), acc, INTERPRET)
        a_offs += BLOCK_K * stride_ak
        b_offs += BLOCK_K * stride_bk
    c_ptrs = C + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptrs, acc + tl.load(c_ptrs, mask=mask, other=0.0), mask=mask)


# 128 x 64: the error epilogue (logits, slope, p, two stored halves) of a 128 x 128 tile spills.
ERROR_TILE = KernelConfig(
    gpu=dict(BLOCK_T=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3),
    compact=dict(BLOCK_T=128, BLOCK_V=32, BLOCK_K=16, num_warps=8, num_stages=2),
    interpret=dict(BLOCK_T=32, BLOCK_V=64, BLOCK_K=32),
)
ACCUMULATE_MM = KernelConfig(
    gpu=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
    compact=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
    interpret=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
)
# Both operands split (the gram): three dots per step; a 128 x 128 output tile spills there.
SPLIT_MM = KernelConfig(
    gpu=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    compact=ACCUMULATE_MM.compact,
    interpret=ACCUMULATE_MM.interpret,
)
_CHUNK_ALIGN = 128


class ErrorChunks:
    """Vocabulary chunks of ``T x width`` errors within the memory budget, and their buffer.

    Half-precision inputs get the error as two halves (``hi + lo``, same bytes as fp32);
    fp32 inputs get it in fp32. ``transposed`` stores it chunk-major (``width x T``) so that
    ``E^T H`` reads both GEMM operands row-major.
    """

    def __init__(self, H: torch.Tensor, num_tokens: int, vocab: int, transposed: bool) -> None:
        self.split = H.dtype != torch.float32
        dtype = H.dtype if self.split else torch.float32
        width = memory_budget() // (4 * max(num_tokens, 1)) // _CHUNK_ALIGN * _CHUNK_ALIGN
        self.width = min(max(_CHUNK_ALIGN, width), vocab)
        self.vocab = vocab
        if transposed:  # rows padded to 16 elements keep the GEMM's loads aligned
            buffer = torch.empty((1 + self.split, self.width, -(-num_tokens // 16) * 16),
                                 dtype=dtype, device=H.device)
            self.parts = [b[:, :num_tokens].T for b in buffer]
        else:
            buffer = torch.empty((1 + self.split, num_tokens, self.width), dtype=dtype, device=H.device)
            self.parts = list(buffer)  # each (T, width)

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Yield ``(start, [hi, lo] or [fp32])`` views of the buffer, each ``(T, chunk)``."""
        for start in range(0, self.vocab, self.width):
            stop = min(start + self.width, self.vocab)
            yield start, [part[:, :stop - start] for part in self.parts]


def write_errors(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                 lse: torch.Tensor, transform: LogitTransform, start: int,
                 parts: list[torch.Tensor]) -> None:
    """Fill ``parts`` (``(T, chunk)`` views) with the errors at vocabulary ``start + j``."""
    T, D = H.shape
    E = parts[0]
    cfg = ERROR_TILE.pick(H, W)
    t_args, flags = transform_args(transform, W)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(E.shape[1], cfg["BLOCK_V"]))
    launch(error_tile_kernel, grid, H, W, labels, H if weights is None else weights, lse, *t_args, E,
           parts[-1], T, D, start, start + E.shape[1], *H.stride(), *W.stride(), labels.stride(0),
           0 if weights is None else weights.stride(0), *E.stride(), **flags,
           HAS_WEIGHTS=weights is not None, SPLIT=len(parts) == 2, EVEN_K=D % cfg["BLOCK_K"] == 0,
           INTERPRET=INTERPRET, **cfg)


def accumulate_mm(A: list[torch.Tensor], B: list[torch.Tensor], C: torch.Tensor) -> None:
    """``C += sum(A) @ sum(B)`` in fp32, for ``[hi, lo]`` or ``[whole]`` operands, any strides."""
    cfg = (SPLIT_MM if len(A) == len(B) == 2 else ACCUMULATE_MM).pick(A[0], B[0])
    (M, K), N = A[0].shape, B[0].shape[1]
    launch(accumulate_mm_kernel, (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])),
           A[0], A[-1], B[0], B[-1], C, M, N, K, *A[0].stride(), *B[0].stride(), *C.stride(),
           A_SPLIT=len(A) == 2, B_SPLIT=len(B) == 2, INTERPRET=INTERPRET, **cfg)
