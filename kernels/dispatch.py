"""Choose the implementation of an op: the Triton kernel or its chunked torch twin.

CPU tensors take the torch twin. CUDA tensors take the Triton kernel unless the benchmark
measured the twin faster for the shape (``TORCH_FASTER``), or the kernel cannot take the inputs
(float64, mixed half dtypes, no Triton). ``backend="torch"`` or ``backend="triton"`` forces a
choice; forcing Triton on inputs it cannot take raises a ValueError that says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch

from .triton_utils import unsupported_reason

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
Impl = TypeVar("Impl", bound=Callable)

# op -> largest token count at which bench/perf/kernels.py measured the torch twin faster than the
# Triton kernel on CUDA (bf16). Empty: on an H200 (bench/results/kernels.md) the twin was 3-15x
# slower than Triton for every op and shape measured.
TORCH_FASTER: dict[str, int] = {}


def pick(op: str, backend: str, torch_impl: Impl, triton_impl: Impl | None,
         *inputs: torch.Tensor | None) -> Impl:
    """The implementation for ``inputs``: the floating tensors of the call, ``H`` first."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return torch_impl
    tensors = [t for t in inputs if t is not None]
    if any(t.numel() == 0 for t in tensors):
        return torch_impl  # nothing to launch a kernel for
    reason = "triton is not installed" if triton_impl is None else unsupported_reason(*tensors)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"{op}: {reason}")
        return triton_impl
    on_cuda = tensors[0].device.type == "cuda"
    if reason is None and on_cuda and tensors[0].shape[0] > TORCH_FASTER.get(op, 0):
        return triton_impl
    return torch_impl
