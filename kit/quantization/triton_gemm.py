"""One Triton kernel for weight-only GEMMs: y = x @ dequant(W)^T, W int8 per-row or int4 group-wise.

Decoding multiplies a handful of tokens by every weight of the model, so its speed is
set by how fast the weights stream from HBM. Weight-only quantization wins by reading
1 byte (int8) or half a byte (int4) per weight instead of 2, *if* the dequantization
happens in registers on the way to the tensor cores instead of in a separate pass
that writes a bf16 copy back to memory. That is what this kernel does:

    for each (BLOCK_M x BLOCK_N) output tile, for each BLOCK_K slice of the inputs:
        x tile   (BLOCK_M, BLOCK_K)    bf16        <- HBM
        w codes  (BLOCK_N, BLOCK_K)    int8, or    <- HBM
                 (BLOCK_N, BLOCK_K/2)  uint8 int4 pairs, split into low / high nibbles
                                       and interleaved back into columns 0, 1, 2, ...
        w = (codes - zero) * scale  -> bf16        (registers; int4: the group's scale)
        acc += x @ w^T                             (tensor cores, fp32 accumulator)

For int8 per-row scales the scale is applied once, to the accumulator at the end.
When BLOCK_K <= group_size a slice lies inside one group and needs one scale a row;
otherwise each column looks its group's scale up.

Decode has M = 1..16 rows, hence few output tiles: on a 132-SM H100 a 2048-wide output
is 32 tiles of 64. Split-K gives each tile's K range to several programs that add
their partial sums atomically into a float32 output, so every SM streams weights.
Tile sizes and the split are autotuned per (M bucket, N, K) — the first call of a new
shape times the candidates, so run one eager call before capturing a CUDA graph.

`dequantize` is the same unpacking as a standalone kernel: for large M the weight is
dequantized to bf16 once per call and cuBLAS does the GEMM.

Imported by `linear.py` when triton is installed (a CPU-only install has none: then the
reference paths run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["weight_only_gemm", "dequantize", "m_bucket"]


def _cfg(bm: int, bn: int, bk: int, split: int, warps: int = 4, stages: int = 4) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split},
                         num_warps=warps, num_stages=stages)


_DECODE_CONFIGS = [_cfg(16, bn, bk, s) for bn in (32, 64, 128) for bk in (128, 256) for s in (1, 2, 4)
                   if not (bn == 128 and s == 1)]
_SMALL_CONFIGS = [_cfg(bm, bn, bk, s, w) for bm, bn, bk, s, w in
                  ((32, 64, 128, 1, 4), (32, 64, 128, 2, 4), (32, 64, 128, 4, 4), (32, 128, 128, 1, 4),
                   (32, 128, 128, 4, 4), (64, 64, 128, 1, 4), (64, 64, 128, 2, 4), (64, 64, 128, 4, 4),
                   (64, 128, 64, 1, 4), (64, 128, 128, 2, 8), (64, 64, 64, 8, 4))]
_LARGE_CONFIGS = [_cfg(bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in
                  ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                   (128, 128, 128, 8, 3), (128, 256, 64, 8, 3))]


def m_bucket(m: int) -> int:
    """The autotuning bucket of a token count: 16, 32, 64, 128, ..."""
    return max(16, triton.next_power_of_2(m))


@triton.jit
def _weight_only_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # this program's share of K, a whole number of BLOCK_K slices
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BITS == 4:
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes holding columns k0 .. k0 + BLOCK_K
            packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_p[None, :],
                             mask=mask_n[:, None] & (offs_p[None, :] < K // 2), other=0)
            # low nibble = even column, high nibble = odd column: interleave back into 0, 1, 2, ...
            # NOTE: measured faster on H100 than two half-width dots over x's even / odd columns
            codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)  # (BLOCK_N, BLOCK_K)
            if BLOCK_K <= GROUP_SIZE:  # one group for the whole slice
                g = k0 // GROUP_SIZE
                s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                if HAS_ZERO:
                    z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.float32)[:, None]
            else:  # several groups in the slice: look each column's group up
                gk = offs_k[None, :] // GROUP_SIZE
                m2 = mask_n[:, None] & mask_k[None, :]
                s = tl.load(s_ptr + offs_n[:, None] * stride_sn + gk, mask=m2, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + offs_n[:, None] * stride_zn + gk, mask=m2, other=0).to(tl.float32)
            if HAS_ZERO:
                w = (codes - z) * s
            else:
                w = (codes - 8.0) * s
            w = w.to(x.dtype)
        else:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    if BITS == 8:  # per-row scale, once
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc, mask=mask)


_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "BITS", "HAS_ZERO"]
_decode = triton.autotune(_DECODE_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])(_weight_only_gemm_kernel)
_small = triton.autotune(_SMALL_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])(_weight_only_gemm_kernel)
_large = triton.autotune(_LARGE_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])(_weight_only_gemm_kernel)


def weight_only_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     *, bits: int, group_size: int, out_features: int) -> torch.Tensor:
    """x (M, K) bf16/fp16; qweight int8 (N, K) or uint8 (N, K/2); scale float32 (N,) (int8) or
    float16 (N, K/group_size) (int4); zero uint8 (N, K/group_size) or None. Returns (M, N) in x.dtype."""
    x = x.contiguous()
    M, K = x.shape
    N = out_features
    bucket = m_bucket(M)
    kernel = _decode if bucket <= 16 else _small if bucket <= 64 else _large
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)  # float32: split-K adds into it
    z = zero if zero is not None else scale  # any pointer: unused without HAS_ZERO

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid](x, qweight, scale, z, y, M, N, K, bucket,
                 x.stride(0), qweight.stride(0), scale.stride(0), z.stride(0), y.stride(0),
                 GROUP_SIZE=group_size if bits == 4 else K, BITS=bits, HAS_ZERO=zero is not None)
    return y.to(x.dtype)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    if BITS == 4:  # BLOCK_K divides GROUP_SIZE: one scale a row for the tile
        offs_p = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_p[None, :],
                         mask=mask_n[:, None] & (offs_p[None, :] < K // 2), other=0)
        codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)  # columns 0, 1, 2, ... again
        g = tl.program_id(1) * BLOCK_K // GROUP_SIZE
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.float32)[:, None]
            w = (codes - z) * s
        else:
            w = (codes - 8.0) * s
    else:
        q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
               group_size: int, out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight (N, K) in `dtype`, in one pass over the codes."""
    N, K = out_features, in_features
    out = torch.empty(N, K, device=qweight.device, dtype=dtype)
    z = zero if zero is not None else scale
    bn, bk = 64, min(128, group_size) if bits == 4 else 128
    _dequantize_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](
        qweight, scale, z, out, N, K, qweight.stride(0), scale.stride(0), z.stride(0),
        GROUP_SIZE=group_size if bits == 4 else K, BITS=bits, HAS_ZERO=zero is not None,
        BLOCK_N=bn, BLOCK_K=bk)
    return out
