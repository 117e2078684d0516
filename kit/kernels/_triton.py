"""Triton, imported on first use, and the choice between a Triton kernel and its torch reference.

NOTE: the kit's default CPU install has no triton, and Triton reads `TRITON_INTERPRET` when a
kernel is JIT-decorated; so the kernels of `kit/kernels/` are plain functions, decorated on their
first call (`jit`), and triton is imported then, never when a kit module is imported.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["triton_module", "jit", "resolve_impl", "next_pow2", "IMPLS"]

IMPLS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_module() -> tuple[Any, Any] | None:
    """(triton, triton.language), or None when triton is not installed."""
    try:
        import triton
        import triton.language as language
    except ImportError:
        return None
    return triton, language


@functools.lru_cache(maxsize=None)
def jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)`, once per kernel; `fn`'s module must have set its global `tl` first."""
    mod = triton_module()
    if mod is None:
        raise RuntimeError(f"{fn.__name__} needs Triton: pip install triton")
    return mod[0].jit(fn)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """'triton' or 'torch' for `impl` ('auto': Triton for a CUDA tensor when triton is installed)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda and triton_module() is not None else "torch"
    if impl == "triton" and triton_module() is None:
        raise RuntimeError("impl='triton' needs the triton package")
    return impl


def next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()
