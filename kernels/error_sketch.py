"""Random projection of the prediction error over the vocabulary, ``R_V^T e_t``."""

from __future__ import annotations

import torch

from . import dispatch
from .logits import (
    LogitTransform,
    OnlineSoftmax,
    check_inputs,
    compute_dtype,
    label_terms,
    memory_budget,
    vocab_chunks,
)
from .triton_utils import (
    HAVE_TRITON,
    INTERPRET,
    KernelConfig,
    jit,
    label_rows_dot,
    launch,
    merge_split,
    mma,
    online_softmax_step,
    project_tile,
    tl,
    transform_args,
    transform_labels,
    transform_tile,
    triton,
    vocab_splits,
)


def error_sketch_torch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, R: torch.Tensor,
                       transform: LogitTransform) -> torch.Tensor:
    # Attention with query h_t, keys W (the vocabulary) and values f' * R: one online pass.
    dtype = compute_dtype(H, W)
    Rc = R.to(dtype)
    softmax = OnlineSoftmax(H.shape[0], (R.shape[1],), dtype, H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        weights = softmax.update(chunk.logits).mul_(chunk.slope)
        softmax.acc += weights @ Rc[chunk.start:chunk.stop]
    _, label_slope = label_terms(H, W, labels, transform, dtype)
    label_rows = Rc[labels] * (label_slope[:, None] if torch.is_tensor(label_slope) else label_slope)
    return label_rows - softmax.acc / softmax.total[:, None]


@jit
def _sketch_partials_kernel(H, W, R, bias, stride_b, scale, softcap, part_max, part_sum, part_acc,
                            T, V, D, K, tiles_per_split, stride_ht, stride_hd, stride_wv, stride_wd,
                            stride_rv, stride_rk, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                            HAS_SOFTCAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr,
                            INTERPRET: tl.constexpr):
    """Flash attention over the vocabulary: query h_t, keys W, values f' * R[:, rcols], one
    vocabulary split; stores ``(max, sum)`` as ``(S, T)`` and the accumulator as ``(S, T, K)``."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    rcols = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
    for i in range(tiles_per_split):  # bounds as in softmax.softmax_partials_kernel
        cols = (split * tiles_per_split + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        z, _ = project_tile(H, W, W, W, rows, cols, T, V, D, stride_ht, stride_hd, stride_wv,
                            stride_wd, stride_wv, stride_wd, BLOCK_T, BLOCK_V, BLOCK_K, False, False,
                            EVEN_K, INTERPRET)
        l, slope = transform_tile(z, cols, V, bias, stride_b, scale, softcap, HAS_BIAS,
                                  HAS_SCALE, HAS_SOFTCAP)
        m, total, alpha, p = online_softmax_step(m, total, l)
        r_ptrs = R + cols.to(tl.int64)[:, None] * stride_rv + rcols[None, :] * stride_rk
        r = tl.load(r_ptrs, mask=(cols < V)[:, None] & (rcols < K)[None, :], other=0.0)
        acc = mma(p * slope, r, acc * alpha[:, None], INTERPRET)
    row_ok = rows < T
    offs = split.to(tl.int64) * T + rows
    # Every R block computes the same (max, sum); the first one stores them.
    first_block = tl.program_id(2) == 0
    tl.store(part_max + offs, m, mask=row_ok & first_block)
    tl.store(part_sum + offs, total, mask=row_ok & first_block)
    tl.store(part_acc + offs[:, None] * K + rcols[None, :], acc,
             mask=row_ok[:, None] & (rcols < K)[None, :])


@jit
def _sketch_finalise_kernel(H, W, R, labels, bias, stride_b, scale, softcap, part_max, part_sum,
                            part_acc, out, T, D, K, splits, stride_ht, stride_hd, stride_wv,
                            stride_wd, stride_rv, stride_rk, stride_y, stride_ot,
                            HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                            HAS_SOFTCAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    """``f'(z_y) R[y] - E_p[f' R]``: splits merged in a fixed order, then the label term."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rcols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < T
    mask = row_ok[:, None] & (rcols < K)[None, :]
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_R), tl.float32)
    for split in range(splits):
        offs = rows.to(tl.int64) + split * T
        m, total, alpha, beta = merge_split(m, total, tl.load(part_max + offs, mask=row_ok, other=0.0),
                                            tl.load(part_sum + offs, mask=row_ok, other=1.0))
        part = tl.load(part_acc + offs[:, None] * K + rcols[None, :], mask=mask, other=0.0)
        acc = acc * alpha[:, None] + beta[:, None] * part
    y = tl.load(labels + rows.to(tl.int64) * stride_y, mask=row_ok, other=0)
    z = label_rows_dot(H, W, rows, y, row_ok, D, stride_ht, stride_hd, stride_wv, stride_wd,
                       BLOCK_T, BLOCK_K)
    _, slope = transform_labels(z, y, bias, stride_b, scale, softcap, HAS_BIAS, HAS_SCALE,
                                HAS_SOFTCAP)
    r_y = tl.load(R + y.to(tl.int64)[:, None] * stride_rv + rcols[None, :] * stride_rk, mask=mask,
                  other=0.0).to(tl.float32)
    tl.store(out + rows.to(tl.int64)[:, None] * stride_ot + rcols[None, :],
             slope[:, None] * r_y - acc / total[:, None], mask=mask)


SKETCH_PARTIALS = KernelConfig(
    gpu=dict(BLOCK_T=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3),
    compact=dict(BLOCK_T=128, BLOCK_V=32, BLOCK_K=16, num_warps=8, num_stages=2),
    interpret=dict(BLOCK_T=32, BLOCK_V=64, BLOCK_K=32),
)
SKETCH_FINALISE = KernelConfig(
    gpu=dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=1),
    compact=dict(BLOCK_T=32, BLOCK_K=64, num_warps=4, num_stages=1),
    interpret=dict(BLOCK_T=32, BLOCK_K=32),
)


def sketch_block(k: int) -> int:
    """Sketch columns per program: tl.dot needs at least 16; more than 64 would press on registers."""
    return min(64, max(16, triton.next_power_of_2(k)))


def _error_sketch_triton(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, R: torch.Tensor,
                         transform: LogitTransform) -> torch.Tensor:
    T, D = H.shape
    V, K = R.shape
    cfg = SKETCH_PARTIALS.pick(H, W, R)
    block_r = sketch_block(K)
    # The (S, T, K) fp32 accumulator partials stay within the memory budget.
    max_splits = max(1, memory_budget() // (T * K * 4))
    splits, per_split = vocab_splits(T, cfg["BLOCK_T"], V, cfg["BLOCK_V"], H.device, max_splits)
    part_max, part_sum = torch.empty((2, splits, T), dtype=torch.float32, device=H.device)
    part_acc = torch.empty((splits, T, K), dtype=torch.float32, device=H.device)
    t_args, flags = transform_args(transform, W)
    strides = (*H.stride(), *W.stride(), *R.stride())
    launch(_sketch_partials_kernel, (triton.cdiv(T, cfg["BLOCK_T"]), splits, triton.cdiv(K, block_r)),
           H, W, R, *t_args, part_max, part_sum, part_acc, T, V, D, K, per_split, *strides, **flags,
           BLOCK_R=block_r, EVEN_K=D % cfg["BLOCK_K"] == 0, INTERPRET=INTERPRET, **cfg)
    out = torch.empty((T, K), dtype=torch.float32, device=H.device)
    fin = SKETCH_FINALISE.pick(H, W, R)
    launch(_sketch_finalise_kernel, (triton.cdiv(T, fin["BLOCK_T"]), triton.cdiv(K, block_r)),
           H, W, R, labels, *t_args, part_max, part_sum, part_acc, out, T, D, K, splits, *strides,
           labels.stride(0), out.stride(0), **flags, BLOCK_R=block_r, **fin)
    return out


error_sketch_triton = _error_sketch_triton if HAVE_TRITON else None


def error_sketch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, R_V: torch.Tensor, *,
                 bias: torch.Tensor | None = None, scale: float | None = None,
                 softcap: float | None = None,
                 backend: dispatch.Backend = "auto") -> torch.Tensor:
    """``R_V^T e_t`` for every token, shape ``(T, k)``; ``R_V`` is ``(V, k)``."""
    check_inputs(H, W, labels, bias, scale, softcap)
    if R_V.dim() != 2 or R_V.shape[0] != W.shape[0]:
        raise ValueError(f"R_V must have shape ({W.shape[0]}, k), got {tuple(R_V.shape)}")
    impl = dispatch.pick("error_sketch", backend, error_sketch_torch, error_sketch_triton,
                         H, W, R_V, bias)
    return impl(H, W, labels, R_V, LogitTransform(bias, scale, softcap))
