"""Paged decode attention in Triton: one query token per sequence over the paged KV cache.

The decode step of a batch reads, for every sequence, all of its cached keys and
values once; attention there is bound by memory bandwidth, not by FLOPs. This kernel
follows vLLM's paged attention and flash-decoding. How it blocks the work:

* grid (num_seqs, num_kv_heads, num_splits). One program per (sequence, kv head, split)
  loads the whole GQA group of query heads that share the kv head, as a
  (group_padded, head_dim) tile (the group is padded to 16 rows for `tl.dot`), so each
  K/V element is read from memory once per group, not once per query head;
* it walks its share of the sequence in tiles of BLOCK_N tokens, finding each token's
  physical slot through the block table
  (slot = block_tables[b, pos // block_size] * block_size + pos % block_size),
  and keeps an online softmax in float32 (exp2, with log2(e) folded into the scale);
* an 8-bit cache (int8 / fp8 e4m3) is read as stored, half the bytes of bf16: each K tile
  is converted to q's dtype in registers (exact: int8 and e4m3 values are bf16 values),
  the dot product is scaled per key by its float32 scale (s = (q . k_q) * k_scale), and
  the V scale is folded into the probabilities (p * v_scale) before the P @ V dot;
* for long contexts and few (sequence, kv head) pairs the sequence is cut into
  `num_splits` splits (flash-decoding); each split writes its running max, sum and
  unnormalised output in float32, and a second kernel merges them per (sequence, head).

CUDA graphs: the launch grid depends only on tensor shapes. `choose_num_splits` reads the
width of the block table (max_blocks, fixed per graph bucket), never `seq_lens`. Each
program reads its sequence's length and divides the keys it sees (all of them, or the
sliding window's) among the splits in whole tiles of BLOCK_N, at least `split_size`
tokens a split: a graph captured for 8k-token tables (33 splits at batch 1 for 8 kv heads)
spreads a 2k-token context over 16 splits and a 256-token one over 2, where fixed ranges of max_context /
num_splits gave a short context to one split (half the speed at 256 tokens, batch 1:
bench/results/attention_h200.json's sweep). A split past the keys runs no tile and
writes an empty partial (max -inf, sum 0) that the merge weighs by zero. A row with
seq_len 0 writes zeros; a padding row with seq_len 1 pointing at the scratch block reads
one slot, equally harmless.

`reference_decode_attention` is the same computation in plain PyTorch (float32), for tests.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kit.backends.triton_support import LOG2E, QUANTIZED_KV_DTYPES, check_paged_cache, is_pow2, load_triton, \
    next_pow2, num_sms

# NOTE: set by `_kernels()` on the first call (see triton_support); the kernels read them as globals.
triton: Any = None
tl: Any = None

__all__ = ["choose_num_splits", "paged_decode_attention", "reference_decode_attention"]

# Split heuristic (flash-decoding): split only while (sequence, kv head) programs fill
# fewer than SPLIT_TARGET_WAVES x the SMs, and keep at least MIN_SPLIT_TOKENS per split of the
# table's width (bench/attention.py's sweep on the H200, batch 1: 2 splits best at 256 tokens, 16 at 2k).
SPLIT_TARGET_WAVES = 2
MIN_SPLIT_TOKENS = 128
# 8-bit caches: each K/V tile is converted in registers before its dot, so a program waits on its loads and
# large batches still gain from a second split of long tables (the sweep on the H200, batch 64, int8:
# 2k 131.6 -> 109.1 us, 8k 503.1 -> 389.1 us; 256 tokens: no gain), up to QUANT_SPLIT_MAX_WAVES of programs
QUANT_SPLIT_MIN_CONTEXT = 1024
QUANT_SPLIT_MAX_WAVES = 8
MAX_SPLITS = 64
NUM_WARPS = 4
NUM_STAGES = 2


# ------------------------------------------------------------------------------ kernels
# Plain functions, JIT-decorated lazily by `_kernels()` (see the module docstring).

def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, sl_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, window, split_size,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_sb, stride_st, stride_sh,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr, KV_QUANT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    first = 0  # the first key any query of this row sees
    if USE_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    # this sequence's keys [first, seq_len) in num_splits shares of whole tiles, >= split_size keys each
    share = tl.cdiv(tl.cdiv(seq_len - first, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    share = tl.maximum(share, split_size)
    lo = first + split * share
    hi = tl.minimum(lo + share, seq_len)  # this split covers positions [lo, hi)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    head = kvh * GROUP + g  # (GROUP_PAD,) query heads of this kv head
    g_ok = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None], other=0.0)  # (GROUP_PAD, HEAD_DIM)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)  # running unnormalised output
    bt_row = bt_ptr + b * stride_btb
    # NOTE: every tile starts below `hi`, so it holds at least one valid key and m_i
    # becomes finite in the first iteration (no -inf - -inf).
    for start in range(lo, hi, BLOCK_N):
        pos = start + n  # (BLOCK_N,)
        ok = pos < hi
        blk = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btn, mask=ok, other=0).to(tl.int64)
        tok = pos % BLOCK_SIZE
        k_off = blk * stride_kb + tok * stride_kt + kvh * stride_kh  # (BLOCK_N,)
        k = tl.load(k_ptr + k_off[None, :] + d[:, None] * stride_kd,
                    mask=ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        if KV_QUANT:
            k = k.to(q.dtype)
        if IEEE_DOT:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if KV_QUANT:  # per-key scale, applied to the dot product (one multiply per score)
            s_off = blk * stride_sb + tok * stride_st + kvh * stride_sh
            ks = tl.load(ks_ptr + s_off, mask=ok, other=0.0)
            s = s * (ks * qk_scale)[None, :]
        else:
            s = s * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))  # (GROUP_PAD, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vb + tok * stride_vt + kvh * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :] * stride_vd,
                    mask=ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        if KV_QUANT:  # the V scale rides on the probabilities: sum_t p_t * vs_t * v_t
            vs = tl.load(vs_ptr + s_off, mask=ok, other=0.0)
            pw = (p * vs[None, :]).to(q.dtype)
            v = v.to(q.dtype)
        else:
            pw = p.to(v.dtype)
        if IEEE_DOT:
            pv = tl.dot(pw, v, input_precision="ieee")
        else:
            pv = tl.dot(pw, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:  # partials (B, H, num_splits[, HEAD_DIM]) in float32, merged by _merge_splits_kernel
        num_heads = tl.num_programs(1) * GROUP
        row = (b * num_heads + head) * tl.num_programs(2) + split  # (GROUP_PAD,)
        tl.store(m_ptr + row, m_i, mask=g_ok)
        tl.store(l_ptr + row, l_i, mask=g_ok)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # seq_len 0: acc is 0, so o is 0
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def _merge_splits_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, num_splits,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_ok = s < num_splits
    row = (b * tl.num_programs(1) + h) * num_splits + s  # (SPLITS_PAD,)
    m = tl.load(m_ptr + row, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (seq_len 0)
    w = tl.exp2(m - m_max)  # empty splits have m = -inf: weight 0
    l_sum = tl.sum(w * l, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)  # (HEAD_DIM,)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, o.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    global triton, tl
    mods = load_triton()
    if mods is None:
        raise RuntimeError("paged_decode_attention needs Triton: pip install triton")
    triton, tl = mods
    # NOTE: split size and block-table width change with the batch's contexts: not specialized (see prefill)
    return (triton.jit(_paged_decode_kernel, do_not_specialize=["split_size", "stride_btb"]),
            triton.jit(_merge_splits_kernel, do_not_specialize=["num_splits"]))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int,
                      quantized: bool = False) -> int:
    """Flash-decoding split count from shapes only (never from seq_lens).

    Split while the (sequence, kv head) programs fill fewer than 2 waves of the SMs, keeping at
    least MIN_SPLIT_TOKENS (128) slots of the table per split and at most 64 splits; a large batch
    keeps one split, or two over an 8-bit cache (`quantized`) whose tables hold >= 1,024 tokens
    while the programs fill fewer than 8 waves.
    """
    programs = num_seqs * num_kv_heads
    if programs >= SPLIT_TARGET_WAVES * num_sms:
        if quantized and max_context >= QUANT_SPLIT_MIN_CONTEXT and programs < QUANT_SPLIT_MAX_WAVES * num_sms:
            return 2
        return 1
    wanted = -(-SPLIT_TARGET_WAVES * num_sms // programs)
    return max(1, min(wanted, max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))


# ------------------------------------------------------------------------------ wrappers
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           num_splits: int | None = None, block_n: int | None = None,
                           num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV cache (Triton).

    q (B, H, D); k_cache / v_cache (num_blocks, block_size, KVH, D), already holding the
    current token, in q's dtype, or int8 / float8_e4m3fn with k_scale / v_scale
    (num_blocks, block_size, KVH) float32; block_tables (B, max_blocks); seq_lens (B,)
    cached tokens including the current one. Sequence b's query sits at position
    seq_lens[b] - 1 and sees keys 0 .. seq_lens[b] - 1, or only the last `sliding_window`
    of them. Returns (B, H, D) in q's dtype (into `out` when given). Any strides are accepted.

    `num_splits` (default: `choose_num_splits` from the shapes), `block_n` (tokens per tile,
    default 128 for an 8-bit cache or a split 16-bit one, 64 for an unsplit 16-bit one, 32 for
    float32; at most 64 for heads wider than 128), `num_warps` and
    `num_stages` are tuning knobs; all are fixed by shapes, so a CUDA graph replays with any
    seq_lens.
    """
    check_paged_cache(q, k_cache, v_cache, block_tables, seq_lens, sliding_window, k_scale, v_scale)
    num_seqs, num_heads, head_dim = q.shape
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be ({num_seqs}, max_blocks >= 1), got {tuple(block_tables.shape)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    decode_kernel, merge_kernel = _kernels()
    group = num_heads // num_kv_heads
    quant = k_cache.dtype in QUANTIZED_KV_DTYPES
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, num_sms(q.device), quant)
    if block_n is None:
        # keys per tile, the best of bench/attention.py's sweep on the H200 (contexts 256..8k, head_dim 128):
        # 8-bit caches and split 16-bit rows 128; 16-bit rows unsplit (large batches) 64; float32 32; heads
        # over 128 wide at most 64 (K and V tiles of 128 x 256 x 2 bytes, twice staged, overflow shared memory)
        block_n = 32 if q.element_size() > 2 else 128 if quant or num_splits > 1 else 64
        if head_dim > 128:
            block_n = min(block_n, 64)
    if not is_pow2(block_n) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # NOTE: each program sizes its split from its own seq_len (whole tiles); `split_size` is the least keys a
    # split takes (one tile, or all of max_context when unsplit), so a short context uses fewer splits
    num_splits = max(1, min(num_splits, -(-max_context // block_n)))
    split_size = block_n if num_splits > 1 else -(-max_context // block_n) * block_n

    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unused pointers when not quantized
    scale_strides = k_scale.stride() if quant else (0, 0, 0)
    split = num_splits > 1
    if split:  # (B, H, num_splits[, D]) float32 partials
        m_part = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = out  # unused
    decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, out, m_part, l_part, acc_part,
        float(scale) * LOG2E, int(sliding_window or 0), split_size,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *scale_strides, *block_tables.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, SPLIT=split, KV_QUANT=quant, IEEE_DOT=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        merge_kernel[(num_seqs, num_heads)](
            m_part, l_part, acc_part, out, num_splits, *out.stride(),
            HEAD_DIM=head_dim, SPLITS_PAD=next_pow2(num_splits), num_warps=NUM_WARPS,
        )
    return out


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                               k_scale: torch.Tensor | None = None,
                               v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_decode_attention` in plain PyTorch, computed in float32 (for tests)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    tables = block_tables.long()
    k = k_cache[tables].reshape(num_seqs, max_context, num_kv_heads, head_dim).float()  # (B, L, KVH, D)
    v = v_cache[tables].reshape(num_seqs, max_context, num_kv_heads, head_dim).float()
    if k_scale is not None:
        k = k * k_scale[tables].reshape(num_seqs, max_context, num_kv_heads, 1)
        v = v * v_scale[tables].reshape(num_seqs, max_context, num_kv_heads, 1)
    qg = q.float().reshape(num_seqs, num_kv_heads, group, head_dim)  # (B, KVH, G, D)
    scores = torch.einsum("bkgd,btkd->bkgt", qg, k) * scale  # (B, KVH, G, L)
    pos = torch.arange(max_context, device=q.device)
    lens = seq_lens.long()[:, None]
    visible = pos[None, :] < lens  # (B, L)
    if sliding_window is not None:
        visible &= pos[None, :] >= lens - sliding_window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # seq_len 0: all -inf -> zeros
    result = torch.einsum("bkgt,btkd->bkgd", probs, v).reshape(num_seqs, num_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out
