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

__all__ = ["kv_cache_dtype", "quantize_kv", "dequantize_kv", "write_kv", "KV_QMAX"]

_INT8_MAX = 127.0
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_MIN_SCALE = 1e-12
KV_QMAX = {torch.int8: _INT8_MAX, torch.float8_e4m3fn: _FP8_MAX}  # an 8-bit cache's storage dtype -> its largest code
_ALGO_OF = {torch.int8: KVCacheQuantAlgo.INT8, torch.float8_e4m3fn: KVCacheQuantAlgo.FP8}


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


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Scatter k, v (T, KVH, D) into the paged pools (num_blocks, block_size, KVH, D) at `slot_mapping`: cast to
    a 16- or 32-bit cache's dtype, or quantized (`quantize_kv`) into an 8-bit cache, the scales into `k_scale` /
    `v_scale` (num_blocks, block_size, KVH)."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    algo = _ALGO_OF.get(k_cache.dtype)
    if algo is None:
        k_cache.view(-1, kvh, d)[slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, kvh, d)[slot_mapping] = v.to(v_cache.dtype)
        return
    (kq, ks), (vq, vs) = quantize_kv(k, algo), quantize_kv(v, algo)
    k_cache.view(-1, kvh, d)[slot_mapping] = kq
    v_cache.view(-1, kvh, d)[slot_mapping] = vq
    k_scale.view(-1, kvh)[slot_mapping] = ks
    v_scale.view(-1, kvh)[slot_mapping] = vs


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize_kv`: q (..., KVH, D), scale (..., KVH) -> x in `dtype`."""
    return (q.float() * scale.float()[..., None]).to(dtype)
