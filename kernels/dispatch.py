"""Choose the implementation of an op: the Triton kernel or its chunked torch twin.

CPU tensors always take the torch twin. CUDA tensors take the Triton kernel when the op has
one; ``backend="torch"`` or ``backend="triton"`` forces a choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
Impl = TypeVar("Impl", bound=Callable)


def pick(op: str, backend: str, device: torch.device, torch_impl: Impl,
         triton_impl: Impl | None) -> Impl:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return torch_impl
    if backend == "triton":
        if triton_impl is None:
            raise ValueError(f"{op}: no Triton kernel is available (triton is not installed)")
        return triton_impl
    if device.type == "cuda" and triton_impl is not None:
        return triton_impl
    return torch_impl
