"""The weight-streaming GEMM: y = x @ dequant(W)^T for a few tokens (decode), one Triton kernel.

Decoding multiplies a handful of tokens (M = 1..64) by every weight of the model, so
its time is the time to stream the weights from HBM once. A quantized weight wins by
its bytes (int8 / fp8: 1 per weight, int4: 1/2) only if nothing else costs more: each
packed byte is read once, dequantized in registers, and never written back. This
kernel does that for three weight kinds:

| kind   | weight (run-time layout)                  | scales                    | activations          |
| ------ | ----------------------------------------- | ------------------------- | -------------------- |
| `int8` | int8 (N, K)                               | float32 (N,), epilogue    | bf16 / fp16          |
| `int4` | int32 words (N, K/8), 8 columns a word    | float16 (K/G, N), a group | bf16 / fp16          |
| `fp8`  | float8_e4m3 (N, K)                        | float32 (N,), epilogue    | fp8, see below       |

fp8 activations are quantized as they are loaded (a static scale, or each token's own amax:
`X_QUANT`), or, `weight_only=True`, taken as they are (bf16 x fp8 weights upcast in registers).

Layout of the work: a program owns BLOCK_N output channels, BLOCK_M tokens and a
1/SPLIT_K share of K, streams its weight rows BLOCK_K channels a step (int4: BLOCK_K / G
whole groups a step, each row's words of a group one contiguous run) and computes the
(BLOCK_N, BLOCK_M) tile of y^T = W x^T in float32. Two ways to form the products, both
autotuned, chosen per shape by measurement:

* `USE_DOT` (tensor cores, swap-AB): the dequantized weight tile is the left operand of
  `tl.dot`, x^T (BLOCK_K, BLOCK_M >= 16) the right one; padded token rows are masked and
  cost no memory traffic. fp8 weights with fp8-quantized activations go to the tensor
  cores as they are (fp8 x fp8, exact products, float32 sums): no weight conversion at all.
* CUDA cores (`USE_DOT=False`, BLOCK_M = 1 or 4: the GEMV of batch-1 decode): each weight
  becomes a float32 in registers and `sum(w * x)` runs on FMAs; nothing goes through
  shared memory. Codes become floats by a bit trick instead of an int -> float convert
  (a quarter-rate instruction): `0x4B000000 | u` is the float32 2**23 + u, so
  `bits(0x4B000000 | u) - (2**23 + z)` is u - z exactly (int8: u = q + 128, z = 128).

int4, per group g of G input channels:

    p    = int32 words (BLOCK_N, G/8)           <- HBM, once (16-byte vectors)
    u    = (repeat8(p) >> 4 * (c % 8)) & 0xF    (BLOCK_N, G), column c = k0 + c: codes in column order
    w    = u - z, exactly (bf16 for the tensor cores: bits(0x4300 | u) - (128 + z); float32 on FMAs)
    part = w @ x[k0 : k0+G]^T                   (float32)
    acc += s_g * part                           (per (n, m), not per weight)

i.e. on the tensor cores (u - z) * s is never formed per weight: the scale acts on the
group's partial sum (z = 8 without zero points); the FMA path multiplies (u - z) by s in
float32, exactly, and sums over the whole stream before one reduction across threads.
int8 / fp8 codes convert exactly; their per-row scale
(and fp8's activation scale) multiply the accumulator once at the end. Every variant
computes the same dequantized product as the reference, up to float32 summation order.

Split-K without extra kernels: with SPLIT_K > 1 each program stores its float32
partial tile to a workspace and bumps a per-tile counter; the program that arrives
last adds the SPLIT_K partials in a fixed order, writes y in the compute dtype and
resets the counter to 0 (so the counters stay valid across calls and CUDA-graph
replays). No memset, no atomics on y, no cast kernel: one launch per GEMM. Split-K is
what fills the SMs when N / BLOCK_N is small (o_proj, down_proj at batch 1).

Tile sizes, the split and the product (tensor cores or FMAs) are autotuned per
(M bucket, N, K, kind) on the first call of a shape (run one eager call before capturing a
CUDA graph); `triton.testing.do_bench` flushes L2 between runs, so the tuning sees the
weights come from HBM as a decode step does. On the CPU the kernel runs under
`TRITON_INTERPRET=1` with an explicit `config` (the tests' reference checks).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
import triton.testing

from kit.quantization.stream_ops import fp8_round, int4_group_dot, int4_group_gemv, mma, sum8, x_tile, x_vec

__all__ = ["stream_gemm", "new_counters", "m_bucket", "tuned_configs", "STREAM_MAX_M", "KINDS", "X_QUANT",
           "DEFAULT_CONFIG"]

STREAM_MAX_M = 64  # the kernel's largest token count (BLOCK_M up to 64)
KINDS = {"int8": 0, "int4": 1, "fp8": 2}
X_QUANT = {"none": 0, "static": 1, "per_token": 2}  # fp8: how activations enter the product
DEFAULT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "USE_DOT": True}  # interpreter


def m_bucket(m: int) -> int:
    """The autotuning bucket of a token count: 1, 4, 16, 32, 64."""
    return 1 if m <= 1 else 4 if m <= 4 else 16 if m <= 16 else 32 if m <= 32 else 64


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _stream_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, xs_ptr, pqs_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, M_BUCKET, stride_xm, stride_wn, stride_ym,
    WKIND: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PQS: tl.constexpr,
    XQ: tl.constexpr, MAGIC: tl.constexpr, MAGIC_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1) row starts
    x_cols = x_ptr + offs_m[None, :] * stride_xm  # (1, BLOCK_M): x^T's columns

    # this program's share of the K steps (a step: BLOCK_K channels; int4: BLOCK_K / GROUP whole groups)
    num_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(num_steps, SPLIT_K)
    s_lo = pid_k * per_split
    s_hi = tl.minimum(s_lo + per_split, num_steps)

    # fp8 activations: the scale of x, static (one scalar) or each token's own (prologue amax)
    if XQ == 1:
        xs = tl.load(xs_ptr)
    elif XQ == 2:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_cols + offs_k[:, None], mask=mask_m[None, :] & (offs_k[:, None] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xt.to(tl.float32)), axis=0))
        xs = tl.maximum(tl.math.div_rn(amax, 448.0), 1e-12)  # (BLOCK_M,)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile
    x_row = x_ptr + pid_m * stride_xm  # the GEMV's one token (USE_DOT=False: BLOCK_M == 1)
    if WKIND == 1:
        GPS: tl.constexpr = BLOCK_K // GROUP  # groups a step
        num_groups = K // GROUP
        if USE_DOT:
            for st in range(s_lo, s_hi):
                for j in tl.static_range(GPS):
                    g = st * GPS + j
                    ok = (g + tl.zeros((1,), dtype=tl.int32)) < num_groups  # (1,): the last step may be short
                    acc += int4_group_dot(w_rows, x_cols, s_ptr, z_ptr, pqs_ptr, g, ok, offs_n, mask_n, mask_m,
                                          N, GROUP, HAS_ZERO, HAS_PQS, MAGIC, MAGIC_BIAS, DOT_F32, BLOCK_N,
                                          BLOCK_M, DT)
        else:
            acc2 = tl.zeros((BLOCK_N, GROUP // 8), dtype=tl.float32)  # per-thread partial sums
            for st in range(s_lo, s_hi):
                for j in tl.static_range(GPS):
                    g = st * GPS + j
                    ok = (g + tl.zeros((1,), dtype=tl.int32)) < num_groups
                    acc2 += int4_group_gemv(w_rows, x_row, s_ptr, z_ptr, pqs_ptr, g, ok, offs_n, mask_n, N,
                                            GROUP, HAS_ZERO, HAS_PQS, DT)
            acc += tl.sum(acc2, axis=1)[:, None]  # one reduction across threads, after the stream
    else:
        offs_kb = tl.arange(0, BLOCK_K)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)  # the GEMV's per-thread partial sums
        for st in range(s_lo, s_hi):
            offs_k = st * BLOCK_K + offs_kb
            mask_k = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if USE_DOT:
                xt = x_tile(x_cols, pqs_ptr, offs_k, mask_k, mask_m, HAS_PQS, DT)  # (BLOCK_K, BLOCK_M)
            else:
                xt = x_vec(x_row, pqs_ptr, offs_k, mask_k, HAS_PQS, DT)  # (BLOCK_K,)
            if XQ != 0:
                if XQ == 1 or not USE_DOT:  # one scale: static, or the GEMV token's own (1,)
                    v = tl.clamp(tl.math.div_rn(xt.to(tl.float32), xs), -448.0, 448.0)
                else:
                    v = tl.clamp(tl.math.div_rn(xt.to(tl.float32), xs[None, :]), -448.0, 448.0)
                if USE_DOT and WKIND == 2 and not DOT_F32:
                    xt = fp8_round(v, tl.float8e4nv, False)  # fp8 x fp8 on the tensor cores
                else:
                    xt = fp8_round(v, DT, DOT_F32)
            if USE_DOT:
                if WKIND == 0:  # NOTE: int8 -> float32 -> bf16 (both exact; a direct cast is wrong in the interpreter)
                    acc = mma(w.to(tl.float32).to(DT), xt, acc, DOT_F32)
                elif XQ != 0:
                    acc = mma(w, xt, acc, DOT_F32)  # fp8 codes times fp8 codes: exact products
                else:
                    acc = mma(w.to(DT), xt, acc, DOT_F32)  # fp8 codes are exact in bf16
            else:
                if WKIND == 0:  # by its bits: q + bits(2**23 + 128) is bits(2**23 + 128 + q) for q in -128..127
                    wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
                else:
                    wf = w.to(tl.float32)
                acc2 += sum8(wf * xt.to(tl.float32)[None, :])
        if not USE_DOT:
            acc += tl.sum(acc2, axis=1)[:, None]  # one reduction across threads, after the stream
        if XQ == 1:
            acc = acc * xs
        elif XQ == 2:
            acc = acc * xs[None, :]
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]

    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    y_mask = mask_m[None, :] & mask_n[:, None]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        ws_tile = ws_ptr + offs_m[None, :] * N + offs_n[:, None]  # workspace (SPLIT_K, M, N) float32
        tl.store(ws_tile + pid_k * M * N, acc, mask=y_mask)
        tile = pid_m * tl.num_programs(0) + pid_n
        # NOTE: every thread's partial is stored before one thread bumps the counter (acq_rel, gpu
        # scope); the last program then reads the partials through L2 (.cg), never a stale L1 line
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + tile, 1)
        if count == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for kk in range(SPLIT_K):  # a fixed order: the sum does not depend on who came last
                total += tl.load(ws_tile + kk * M * N, mask=y_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


# ------------------------------------------------------------------ autotuning
def _cfg(bm: int, bn: int, split: int, bk: int = 128, warps: int = 4, stages: int = 4,
         dot: bool = True) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "USE_DOT": dot},
                         num_warps=warps, num_stages=stages)


# NOTE: few candidates on purpose: every one is a compile per kind (about a second each on an H100
# host). Buckets 1, 4 and 16 share the tensor-core tiles (M_BUCKET is not specialized: one compile
# serves all three); M = 1 also tries the GEMV on FMAs (BLOCK_M = 1: no padded tensor-core rows, no
# shared memory), with few warps and many programs or more rows a program. The pruning keeps the
# splits of K that fill the SMs.
_DOT16 = [_cfg(16, 32, 1, 256), _cfg(16, 64, 1, 256, stages=3), _cfg(16, 64, 1), _cfg(16, 64, 4),
          _cfg(16, 128, 8, warps=8, stages=3)]
_GEMV = [_cfg(1, 64, 1, 128, stages=3, dot=False), _cfg(1, 32, 1, 256, warps=2, stages=4, dot=False),
         _cfg(1, 128, 1, 256, warps=8, stages=3, dot=False), _cfg(1, 64, 4, 256, stages=3, dot=False),
         _cfg(1, 128, 8, 128, warps=8, stages=3, dot=False)]
_CONFIGS = {
    1: _GEMV + _DOT16[2:],
    4: _DOT16,
    16: _DOT16,
    32: [_cfg(32, 64, 1, stages=3), _cfg(32, 64, 2, stages=3), _cfg(32, 128, 4, warps=8, stages=3)],
    64: [_cfg(64, 64, 1, stages=3), _cfg(64, 128, 2, warps=8, stages=3), _cfg(64, 128, 4, warps=8, stages=3)],
}


@functools.lru_cache(maxsize=None)
def _num_sms() -> int:
    """Streaming multiprocessors of the current GPU (132 on an H100 / H200 SXM; 132 off CUDA)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132


def _step_k(bk: int, wkind: int, group: int) -> int:
    """A step's channels: BLOCK_K, for int4 a whole number (>= 1) of groups."""
    return max(group, bk // group * group) if wkind == 1 else bk


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles that give at least ~one program per SM with the least split of K (int4: BLOCK_K
    rounded to whole groups)."""
    a = {**named_args, **kwargs}
    n, k, wkind, group = a["N"], a["K"], a["WKIND"], a["GROUP"]
    out, seen, first = [], set(), None
    for c in configs:
        kw = dict(c.kwargs, BLOCK_K=_step_k(c.kwargs["BLOCK_K"], wkind, group))
        cfg = triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)
        first = first or cfg
        bn, split = kw["BLOCK_N"], kw["SPLIT_K"]
        tiles = triton.cdiv(n, bn)
        if split > 1 and (triton.cdiv(k, kw["BLOCK_K"]) // split < 2 or tiles * (split // 2) >= 2 * _num_sms()):
            continue  # too little K per program, or enough programs with half the split
        sig = (kw["BLOCK_M"], bn, kw["BLOCK_K"], split, kw["USE_DOT"], c.num_warps, c.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(cfg)
    return out or [first]


@functools.lru_cache(maxsize=None)
def _max_split(bucket: int, n: int, k: int, wkind: int, group: int) -> int:
    """The largest SPLIT_K the autotuner may pick for this shape: what the workspace must hold."""
    return max(c.kwargs["SPLIT_K"] for c in _prune(_CONFIGS[bucket], {"N": n, "K": k}, WKIND=wkind, GROUP=group))


_KEY = ["M_BUCKET", "N", "K", "WKIND", "GROUP", "XQ"]
_bench = functools.partial(triton.testing.do_bench, warmup=5, rep=20)


def _autotune(configs: list[triton.Config]):
    try:  # a short benchmark per candidate (the default spends ~0.1 s on each)
        return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune}, do_bench=_bench)
    except TypeError:  # pragma: no cover - a triton without `do_bench=`
        return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune})


_TUNED = {bucket: _autotune(cs)(_stream_kernel) for bucket, cs in _CONFIGS.items()}


def tuned_configs() -> list[dict]:
    """What the autotuner chose so far: one row per (M bucket, N, K, kind, group, activation mode)."""
    kinds = {v: k for k, v in KINDS.items()}
    xq = {v: k for k, v in X_QUANT.items()}
    rows = []
    for tuner in _TUNED.values():
        for key, cfg in getattr(tuner, "cache", {}).items():
            bucket, n, k, wkind, group, x_quant = key[:6]
            rows.append(dict(m_bucket=bucket, N=n, K=k, kind=kinds[wkind], group=group, x_quant=xq[x_quant],
                             **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return rows


# ------------------------------------------------------------------ the call
def new_counters(out_features: int, device: torch.device | str) -> torch.Tensor:
    """The split-K arrival counters of one linear (int32 zeros; the kernel leaves them zero)."""
    return torch.zeros(triton.cdiv(STREAM_MAX_M, 16) * triton.cdiv(out_features, 16), dtype=torch.int32,
                       device=device)


def stream_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *, kind: str, out_features: int,
                counters: torch.Tensor, group_size: int = 0, zero: torch.Tensor | None = None,
                pre_quant_scale: torch.Tensor | None = None, x_scale: torch.Tensor | None = None,
                per_token: bool = False, weight_only: bool = False, magic: bool = True,
                config: dict | None = None) -> torch.Tensor:
    """y (M, N) in x.dtype = x (M, K) @ dequant(w)^T for M <= STREAM_MAX_M.

    `w`/`scale`/`zero` in the run-time layout of `kind` (see the table above; int4 from
    `weight_layout.int4_words` / `transpose_groups`). fp8: `x_scale` float32 (1,) quantizes x
    with a static scale, `per_token=True` with each row's own, `weight_only=True` keeps x as it is
    (bf16 x upcast fp8 weights). `config` forces a tile (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
    USE_DOT); without it a CUDA call is autotuned.
    """
    if kind not in KINDS:
        raise ValueError(f"stream_gemm: kind {kind!r} is not one of {', '.join(KINDS)}")
    x = x.contiguous()
    M, K = x.shape
    N = out_features
    if M > STREAM_MAX_M:
        raise ValueError(f"stream_gemm: {M} tokens; the weight-streaming kernel takes at most {STREAM_MAX_M}")
    if kind == "int4" and (group_size < 32 or group_size & (group_size - 1) or K % group_size):
        raise ValueError(f"stream_gemm: int4 needs a power-of-two group_size >= 32 dividing in_features {K}, "
                         f"got {group_size}")
    if kind == "int4" and w.dtype is not torch.int32:
        raise ValueError(f"stream_gemm: int4 weights are int32 words (weight_layout.int4_words), got {w.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"stream_gemm: x must be bfloat16 or float16, got {x.dtype}")
    if kind == "fp8" and (x_scale is not None) + per_token + weight_only != 1:
        raise ValueError("stream_gemm: fp8 needs exactly one of x_scale (static), per_token=True or "
                         f"weight_only=True; got x_scale={x_scale is not None}, per_token={per_token}, "
                         f"weight_only={weight_only}")
    xq = 0 if kind != "fp8" or weight_only else (2 if per_token else 1)
    magic_word, magic_bias = (0x4300, 128.0) if x.dtype is torch.bfloat16 else (0x6400, 1024.0)
    if not magic:
        magic_word, magic_bias = 0, 0.0
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bucket = m_bucket(M)
    group = group_size if kind == "int4" else 0
    tuned = config is None and x.is_cuda
    if tuned:
        split_max = _max_split(bucket, N, K, KINDS[kind], group)
    else:
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        cfg["BLOCK_K"] = _step_k(cfg["BLOCK_K"], KINDS[kind], group)
        split_max = cfg["SPLIT_K"]
        if not cfg["USE_DOT"] and cfg["BLOCK_M"] != 1:
            raise ValueError(f"stream_gemm: config {config}: the FMA product (USE_DOT=False) takes BLOCK_M=1")
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        if split_max > 1 and tiles > counters.numel():
            raise ValueError(f"stream_gemm: config {config} makes {tiles} output tiles; the counters hold "
                             f"{counters.numel()} (BLOCK_M >= 16 or M <= BLOCK_M, BLOCK_N >= 16)")
    ws = torch.empty(split_max * M * N if split_max > 1 else 1, device=x.device, dtype=torch.float32)
    z = zero if zero is not None else scale  # any pointer where unused
    pqs = pre_quant_scale if pre_quant_scale is not None else scale
    xs = x_scale if x_scale is not None else scale
    args = (x, w, scale, z, xs, pqs, y, ws, counters, M, N, K, bucket, x.stride(0), w.stride(0), y.stride(0))
    consts = dict(WKIND=KINDS[kind], GROUP=group, HAS_ZERO=zero is not None,
                  HAS_PQS=pre_quant_scale is not None, XQ=xq, MAGIC=magic_word, MAGIC_BIAS=magic_bias,
                  DOT_F32=not x.is_cuda)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]), meta["SPLIT_K"])

    if tuned:
        _TUNED[bucket][grid](*args, **consts)
    else:
        _stream_kernel[grid](*args, **consts, **cfg)
    return y
