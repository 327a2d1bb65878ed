"""The online softmax over the vocabulary, shared by the ops: the log-sum-exp every error op
starts from, and the one-pass expectation ``E_p[f' (G h)]`` of ``reference_score``.

The torch form folds vocabulary chunks into an ``OnlineSoftmax``; the Triton form runs the
vocabulary splits as programs and merges them in a fixed order.
"""

from __future__ import annotations

import torch

from .logits import LogitTransform, OnlineSoftmax, compute_dtype, label_terms, vocab_chunks
from .triton_utils import (
    INTERPRET,
    KernelConfig,
    jit,
    label_rows_dot,
    launch,
    merge_split,
    online_softmax_step,
    project_tile,
    split_halves,
    tl,
    transform_args,
    transform_labels,
    transform_tile,
    triton,
    vocab_splits,
)


def logsumexp_torch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                    transform: LogitTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, l_y)`` per token, chunk by chunk over the vocabulary."""
    dtype = compute_dtype(H, W)
    softmax = OnlineSoftmax(H.shape[0], (), dtype, H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        softmax.update(chunk.logits)
    label_logit, _ = label_terms(H, W, labels, transform, dtype)
    return softmax.logsumexp(), label_logit


@jit
def softmax_partials_kernel(H, W, G, G_lo, bias, stride_b, scale, softcap, part_max, part_sum, part_acc,
                            T, V, D, tiles_per_split, stride_ht, stride_hd, stride_wv, stride_wd,
                            stride_gv, stride_gd, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                            HAS_SOFTCAP: tl.constexpr, WITH_G: tl.constexpr, SPLIT_G: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                            EVEN_K: tl.constexpr, INTERPRET: tl.constexpr):
    """One (token tile, vocabulary split): running max and sum of ``exp(l)`` over the split and,
    with ``WITH_G``, ``sum_v exp(l_v - max) f'_v (G h)_v``, stored per split as ``(S, T)``;
    ``SPLIT_G``: ``G`` in two halves, ``G + G_lo`` (``project_tile``)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T,), tl.float32)
    # Every split runs tiles_per_split tiles (bounds from arguments, which the interpreter
    # needs); the last split's tiles past V are all -inf and add nothing. Its first tile is
    # always in range, so the running max is finite before any such tile.
    for i in range(tiles_per_split):
        cols = (split * tiles_per_split + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        z, gz = project_tile(H, W, G, G_lo, rows, cols, T, V, D, stride_ht, stride_hd, stride_wv,
                             stride_wd, stride_gv, stride_gd, BLOCK_T, BLOCK_V, BLOCK_K, WITH_G,
                             SPLIT_G, EVEN_K, INTERPRET)
        l, slope = transform_tile(z, cols, V, bias, stride_b, scale, softcap, HAS_BIAS,
                                  HAS_SCALE, HAS_SOFTCAP)
        m, total, alpha, p = online_softmax_step(m, total, l)
        if WITH_G:
            acc = acc * alpha + tl.sum(p * slope * gz, axis=1)
    out = split.to(tl.int64) * T + rows
    row_ok = rows < T
    tl.store(part_max + out, m, mask=row_ok)
    tl.store(part_sum + out, total, mask=row_ok)
    if WITH_G:
        tl.store(part_acc + out, acc, mask=row_ok)


@jit
def softmax_finalise_kernel(H, W, G, labels, bias, stride_b, scale, softcap, part_max, part_sum,
                            part_acc, out_a, out_b, T, D, splits, stride_ht, stride_hd, stride_wv,
                            stride_wd, stride_gv, stride_gd, stride_y, HAS_BIAS: tl.constexpr,
                            HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                            WITH_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Merge the splits in a fixed order (deterministic, no atomics) and add the label terms.

    Writes ``out_a = lse``, ``out_b = l_y`` or, with ``WITH_G``,
    ``out_a = f'(z_y) (G h)_y - E_p[f' (G h)]``.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    m = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T,), tl.float32)
    for split in range(splits):
        offs = rows.to(tl.int64) + split * T
        part_m = tl.load(part_max + offs, mask=row_ok, other=0.0)
        m, total, alpha, beta = merge_split(m, total, part_m,
                                            tl.load(part_sum + offs, mask=row_ok, other=1.0))
        if WITH_G:
            acc = acc * alpha + beta * tl.load(part_acc + offs, mask=row_ok, other=0.0)
    y = tl.load(labels + rows.to(tl.int64) * stride_y, mask=row_ok, other=0)
    z = label_rows_dot(H, W, rows, y, row_ok, D, stride_ht, stride_hd, stride_wv, stride_wd,
                       BLOCK_T, BLOCK_K)
    label_logit, label_slope = transform_labels(z, y, bias, stride_b, scale, softcap, HAS_BIAS,
                                                HAS_SCALE, HAS_SOFTCAP)
    if WITH_G:
        projected = label_rows_dot(H, G, rows, y, row_ok, D, stride_ht, stride_hd, stride_gv,
                                   stride_gd, BLOCK_T, BLOCK_K)
        tl.store(out_a + rows, label_slope * projected - acc / total, mask=row_ok)
    else:
        tl.store(out_a + rows, m + tl.log(total), mask=row_ok)
        tl.store(out_b + rows, label_logit, mask=row_ok)


# The fastest single tile of bench/perf/tune_kernels.py on an H200 across the benchmark shapes (within
# 14% of the best tile for each; bench/results/kernels.md).
LSE_PARTIALS = KernelConfig(
    gpu=dict(BLOCK_T=128, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),
    compact=dict(BLOCK_T=128, BLOCK_V=32, BLOCK_K=16, num_warps=8, num_stages=2),
    interpret=dict(BLOCK_T=32, BLOCK_V=64, BLOCK_K=32),
)
FINALISE = KernelConfig(
    gpu=dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=1),
    compact=dict(BLOCK_T=32, BLOCK_K=64, num_warps=4, num_stages=1),
    interpret=dict(BLOCK_T=32, BLOCK_K=32),
)


def softmax_over_vocab(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                       transform: LogitTransform, G: torch.Tensor | None,
                       config: KernelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the split partials and the finaliser: ``(lse, l_y)``, or ``(s, unused)`` with G.

    An fp32 ``G`` beside half ``H`` reaches the partials as two half matrices (``split_halves``,
    a transient copy of ``G``'s size, made per call) and the finaliser, which reads only label
    rows, as is."""
    T, D = H.shape
    V = W.shape[0]
    with_g = G is not None
    G = W if G is None else G  # never read without WITH_G
    split_g = with_g and G.dtype == torch.float32 and H.dtype != torch.float32
    tile_g, tile_lo = split_halves(G, H.dtype) if split_g else (G, G)  # G_lo unread unless split
    cfg = config.pick(H, W, tile_g)
    splits, per_split = vocab_splits(T, cfg["BLOCK_T"], V, cfg["BLOCK_V"], H.device)
    part = torch.empty((3 if with_g else 2, splits, T), dtype=torch.float32, device=H.device)
    t_args, flags = transform_args(transform, W)
    launch(softmax_partials_kernel, (triton.cdiv(T, cfg["BLOCK_T"]), splits), H, W, tile_g, tile_lo, *t_args,
           part[0], part[1], part[-1], T, V, D, per_split, *H.stride(), *W.stride(), *tile_g.stride(),
           **flags, WITH_G=with_g, SPLIT_G=split_g, EVEN_K=D % cfg["BLOCK_K"] == 0, INTERPRET=INTERPRET,
           **cfg)
    out = torch.empty((2, T), dtype=torch.float32, device=H.device)
    fin = FINALISE.pick(H, W, G)
    launch(softmax_finalise_kernel, (triton.cdiv(T, fin["BLOCK_T"]),), H, W, G, labels, *t_args,
           part[0], part[1], part[-1], out[0], out[1], T, D, splits, *H.stride(), *W.stride(), *G.stride(),
           labels.stride(0), **flags, WITH_G=with_g, **fin)
    return out[0], out[1]
