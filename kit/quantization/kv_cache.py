"""Quantized KV cache: int8 or fp8 keys / values with one scale per token per head.

The KV cache grows with every token of every running sequence and, for long contexts,
outweighs the model. Storing K and V in 8 bits halves it (vs bf16), so twice the
tokens fit in the same pool. Each (token, kv head) vector of `head_dim` values gets
its own scale, computed when the token is written, so no calibration is needed and an
outlier token or head costs precision only to itself:

    INT8: scale = amax / 127,  q = round(x / scale)  int8       x ~ q * scale
    FP8:  scale = amax / 448,  q = e4m3(x / scale)   float8     x ~ q * scale

Shapes: x (..., num_kv_heads, head_dim) -> q of the same shape, scale
(..., num_kv_heads) float32. For the paged pool (num_blocks, block_size, KVH, D) the
scales form a parallel pool (num_blocks, block_size, KVH), written through the same
`slot_mapping`; attention dequantizes the gathered blocks before (or, in a fused
kernel, inside) the dot products. With head_dim 128 the scales add 3 % to the 8-bit
cache.

Worst-case error per element: int8 half a step, amax / 254; fp8 a relative 2^-4 of
the value (plus subnormal flushing near zero).
"""

from __future__ import annotations

import torch

from kit.quantization.algo import KVCacheQuantAlgo

__all__ = ["kv_cache_dtype", "quantize_kv", "dequantize_kv"]

_INT8_MAX = 127.0
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_MIN_SCALE = 1e-12


def _algo(algo: KVCacheQuantAlgo | str) -> KVCacheQuantAlgo:
    try:
        return algo if isinstance(algo, KVCacheQuantAlgo) else KVCacheQuantAlgo(str(algo).upper())
    except ValueError:
        raise ValueError(f"kv cache algo {algo!r} is not one of {', '.join(a.value for a in KVCacheQuantAlgo)}") from None


def kv_cache_dtype(algo: KVCacheQuantAlgo | str) -> torch.dtype:
    """The storage dtype of the cache for `algo`: int8 or float8_e4m3fn."""
    return torch.int8 if _algo(algo) is KVCacheQuantAlgo.INT8 else torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, algo: KVCacheQuantAlgo | str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., num_kv_heads, head_dim) -> (q same shape int8 / fp8, scale (..., num_kv_heads) float32).

    scale = absmax * float32(1 / qmax), a product: a tensor divided by a Python number is a product by its
    reciprocal on a GPU and a true division on the CPU, so the product is what both devices (and the fused
    write of kit/kernels/rope_cache.py) compute alike; the codes are x / scale, a true division everywhere.
    """
    a = _algo(algo)
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # (..., KVH)
    if a is KVCacheQuantAlgo.INT8:
        scale = (amax * (1.0 / _INT8_MAX)).clamp(min=_MIN_SCALE)
        q = torch.round(xf / scale[..., None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    else:
        scale = (amax * (1.0 / _FP8_MAX)).clamp(min=_MIN_SCALE)
        q = (xf / scale[..., None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize_kv`: q (..., KVH, D), scale (..., KVH) -> x in `dtype`."""
    return (q.float() * scale.float()[..., None]).to(dtype)
