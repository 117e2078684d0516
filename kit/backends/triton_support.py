"""What the Triton attention kernels share: importing Triton lazily, the SM count, input checks.

Triton is optional: the kit's default CPU install has none, and the PyTorch backend
imports the kernel modules anyway. So nothing here imports triton at module load;
`load_triton()` does it on the first kernel call. That also lets a test or notebook set
`TRITON_INTERPRET=1` before that call and run the kernels on the CPU.

The paged KV cache the kernels read: K and V pools (num_blocks, block_size, KVH, D) in
the compute dtype, or in int8 / float8_e4m3fn with a float32 scale per (token, kv head)
in parallel pools (num_blocks, block_size, KVH) (`kit/quantization/kv_cache.py`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["load_triton", "triton_available", "num_sms", "next_pow2", "is_pow2", "check_paged_cache",
           "QUANTIZED_KV_DTYPES", "FLOAT_DTYPES", "LOG2E"]

LOG2E = 1.4426950408889634  # the kernels use exp2, with log2(e) folded into the softmax scale
QUANTIZED_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_TRITON: tuple[Any, Any] | None = None


def load_triton() -> tuple[Any, Any] | None:
    """(triton, triton.language), imported once; None when Triton is not installed."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton as triton_module
            import triton.language as language
        except ImportError:
            return None
        _TRITON = (triton_module, language)
    return _TRITON


def triton_available() -> bool:
    """Whether Triton can be imported (running the kernels also needs CUDA tensors,
    or TRITON_INTERPRET=1 set before the first call for CPU tensors)."""
    return load_triton() is not None


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 132 (an H100 SXM) on the CPU, so the interpreter
    exercises the same launch choices as the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_paged_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, sliding_window: int | None,
                      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """Validate what every paged kernel reads: q (rows, H, D) and the paged pools (with scales if 8-bit)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (num_rows, num_heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_dim}) differ")
    if not is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 (64, 128, ...), got {head_dim}")
    if not is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if q.device.type != "cuda" and q.dtype == torch.bfloat16:
        # NOTE: Triton's interpreter (the CPU) gets bf16 tl.dot wrong (errors of 1e8 on unit-scale data)
        raise ValueError(f"the paged attention kernels on {q.device} run in Triton's interpreter, whose "
                         f"bfloat16 dot products are wrong; use float32 (or float16) there")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.dtype in QUANTIZED_KV_DTYPES:
        if k_scale is None or v_scale is None:
            raise ValueError(f"an {k_cache.dtype} cache needs k_scale and v_scale "
                             f"({num_blocks}, {block_size}, {num_kv_heads}) float32")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s.shape != k_cache.shape[:3] or s.dtype != torch.float32:
                raise ValueError(f"{name} must be {tuple(k_cache.shape[:3])} float32, got {tuple(s.shape)} {s.dtype}")
        if k_scale.stride() != v_scale.stride():
            raise ValueError(f"k_scale and v_scale must share strides, got {k_scale.stride()} and {v_scale.stride()}")
    elif k_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype (or the cache be int8 / float8_e4m3fn "
                         f"with scales), got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale / v_scale belong to an int8 or float8_e4m3fn cache, not to {k_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0] or block_tables.shape[1] < 1:
        raise ValueError(f"block_tables must be ({seq_lens.shape[0]}, max_blocks >= 1), "
                         f"got {tuple(block_tables.shape)}")
    if seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be (num_seqs,), got {tuple(seq_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be None or > 0, got {sliding_window}")
    tensors = [q, k_cache, v_cache, block_tables, seq_lens] + [s for s in (k_scale, v_scale) if s is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
