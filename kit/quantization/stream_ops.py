"""The Triton building blocks of the weight-streaming GEMM (`stream_gemm.py`): operand loads and
code -> float conversions, each exact.

* `mma` / `sub_exact`: a tensor-core product and a 16-bit subtraction, widened to float32 under
  Triton's interpreter (whose bf16 arithmetic is wrong) so that the CPU tests see the GPU's numbers;
* `fp8_round`: float32 -> float8_e4m3 (nearest, ties to even, saturating), emulated on the CPU;
* `codes_f32`: integer codes to float32 by their bits (`0x4B000000 | u` is 2**23 + u): no
  int -> float convert, a quarter-rate instruction;
* `x_vec` / `x_tile`: one token's activations (the GEMV) or x^T (BLOCK_K, BLOCK_M) (the tensor
  cores), AWQ's pre_quant_scale applied and rounded to the compute dtype;
* `int4_codes`: one group's codes of a tile of rows, from int32 words (`weight_layout.py`), in
  column order; `int4_group_dot` / `int4_group_gemv`: one group's contribution, on the tensor
  cores or on FMAs; `sum8`: sums of 8 adjacent columns within a thread.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["mma", "sub_exact", "fp8_round", "codes_f32", "sum8", "x_vec", "x_tile", "int4_codes",
           "int4_group_dot", "int4_group_gemv"]


@triton.jit
def mma(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b in float32. NOTE: Triton's interpreter multiplies bf16 operands wrongly, so on the
    CPU (DOT_F32) both are widened first (exact) and multiplied in IEEE float32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def sub_exact(a, b, DOT_F32: tl.constexpr):
    """a - b in their 16-bit dtype (exact here: small integers). NOTE: the interpreter computes bf16
    arithmetic wrongly, so on the CPU (DOT_F32) it is done in float32, with the same result."""
    if DOT_F32:
        return a.to(tl.float32) - b.to(tl.float32)
    return a - b


@triton.jit
def fp8_round(v, DT: tl.constexpr, EMULATE: tl.constexpr):
    """v (float32, within +-448) rounded to float8_e4m3 (nearest, ties to even), as DT.

    NOTE: Triton's interpreter converts float32 -> fp8 wrongly when rounding carries into the
    exponent (126.8 -> 64); on the CPU (EMULATE) the rounding is done on the float32 bits."""
    if EMULATE:
        bits = v.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1  # keep 3 of the 23 mantissa bits, ties to even
        normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
        c = 24576.0  # 1.5 * 2**14: adding it rounds to a multiple of 2**-9, the subnormal step
        sub = tl.where(v >= 0, (v + c) - c, -((c - v) - c))
        return tl.where(tl.abs(v) < 0.015625, sub, normal).to(DT)
    return v.to(tl.float8e4nv).to(DT)


@triton.jit
def codes_f32(u):
    """u int32 (0 <= u < 2**23) -> float32 2**23 + u, by its bits (no int -> float convert)."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def sum8(t):
    """(R, C) -> (R, C / 8): sums of 8 adjacent columns (adjacent in one thread's registers: no shuffles)."""
    return tl.sum(tl.reshape(t, (t.shape[0], t.shape[1] // 8, 8)), axis=2)


@triton.jit
def x_vec(x_row, pqs_ptr, offs_k, mask_k, HAS_PQS: tl.constexpr, DT: tl.constexpr):
    """One token's x[offs_k] (BK,) in DT (the GEMV's activations), pre_quant_scale applied as in `x_tile`."""
    xv = tl.load(x_row + offs_k, mask=mask_k, other=0.0)
    if HAS_PQS:
        xv = (xv.to(tl.float32) * tl.load(pqs_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)).to(DT)
    return xv


@triton.jit
def x_tile(x_cols, pqs_ptr, offs_k, mask_k, mask_m, HAS_PQS: tl.constexpr, DT: tl.constexpr):
    """x^T (BK, BLOCK_M) in DT; AWQ's pre_quant_scale applied and rounded to DT as a separate multiply would be."""
    xt = tl.load(x_cols + offs_k[:, None], mask=mask_m[None, :] & mask_k[:, None], other=0.0)
    if HAS_PQS:
        pq = tl.load(pqs_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        xt = (xt.to(tl.float32) * pq[:, None]).to(DT)
    return xt


@triton.jit
def int4_codes(w_rows, g, ok, mask_n, GROUP: tl.constexpr):
    """Group g's codes of BLOCK_N rows: (BLOCK_N, GROUP) int32 in 0..15, in column order.

    One load of GROUP / 8 int32 words a row (16-byte vectors); every word is repeated 8 times in
    registers (`tl.interleave` with itself, 3 times) and column c takes nibble c % 8 of its copy."""
    offs_w = tl.arange(0, GROUP // 8)
    p = tl.load(w_rows + (g * (GROUP // 8) + offs_w)[None, :], mask=mask_n[:, None] & ok, other=0)  # (BN, G/8)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)  # (BLOCK_N, GROUP): word c // 8 at column c
    shifts = (tl.arange(0, GROUP) % 8) * 4
    return (p >> shifts[None, :]) & 0xF


@triton.jit
def int4_group_dot(w_rows, x_cols, s_ptr, z_ptr, pqs_ptr, g, ok, offs_n, mask_n, mask_m, N,
                   GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PQS: tl.constexpr, MAGIC: tl.constexpr,
                   MAGIC_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, DT: tl.constexpr):
    """Tensor cores: s_g * sum over group g of (code - z) * x, (BLOCK_N, BLOCK_M) float32 (0 where not `ok`)."""
    u = int4_codes(w_rows, g, ok, mask_n, GROUP)  # (BLOCK_N, GROUP)
    offs_k = g * GROUP + tl.arange(0, GROUP)
    xt = x_tile(x_cols, pqs_ptr, offs_k, (offs_k >= 0) & ok, mask_m, HAS_PQS, DT)  # (GROUP, BLOCK_M)
    # code - zero, exactly, in the compute dtype: small integers (-15 .. 15) are exact in bf16
    if HAS_ZERO:
        zc = (tl.load(z_ptr + g * N + offs_n, mask=mask_n & ok, other=0).to(tl.float32) + MAGIC_BIAS).to(DT)
        zc = zc[:, None]
    else:
        zc = tl.full((1, 1), 8.0 + MAGIC_BIAS, DT)
    if MAGIC != 0:  # 0x4300 | u is bf16 128 + u (0x6400 | u: fp16 1024 + u): no int -> float convert
        w = sub_exact((u | MAGIC).to(tl.uint16).to(DT, bitcast=True), zc, DOT_F32)
    else:
        w = sub_exact(u.to(tl.float32).to(DT), zc, DOT_F32)
    part = mma(w, xt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_F32)  # sum of (code - z) * x
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n & ok, other=0.0).to(tl.float32)
    return s[:, None] * part  # the group's scale, once per output instead of once per weight


@triton.jit
def int4_group_gemv(w_rows, x_row, s_ptr, z_ptr, pqs_ptr, g, ok, offs_n, mask_n, N,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PQS: tl.constexpr, DT: tl.constexpr):
    """FMAs, one token: s_g * sums of (code - z) * x over each 8 columns, (BLOCK_N, GROUP / 8) float32,
    summed over its columns only after the last step (no cross-thread reduction per group)."""
    u = int4_codes(w_rows, g, ok, mask_n, GROUP)  # (BLOCK_N, GROUP)
    offs_k = g * GROUP + tl.arange(0, GROUP)
    xv = x_vec(x_row, pqs_ptr, offs_k, (offs_k >= 0) & ok, HAS_PQS, DT).to(tl.float32)  # (GROUP,)
    if HAS_ZERO:
        zf = tl.load(z_ptr + g * N + offs_n, mask=mask_n & ok, other=0).to(tl.float32)[:, None] + 8388608.0
    else:
        zf = 8388616.0  # 2**23 + 8
    w = codes_f32(u) - zf  # (BLOCK_N, GROUP) float32: code - zero, exactly
    part = sum8(w * xv[None, :])  # (BLOCK_N, GROUP / 8): the 8 columns of a word, summed in its thread
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n & ok, other=0.0).to(tl.float32)
    return part * s[:, None]
