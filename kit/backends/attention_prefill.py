"""Varlen paged flash-attention in Triton: prompt chunks and mixed batches over the paged KV cache.

A prefill (or mixed chunk + decode) batch packs the queries of many sequences one after
another, `query_start_loc` marking where each begins; sequence s has q_len new tokens and
seq_len tokens in the cache after this step, so its queries sit at positions
seq_len - q_len .. seq_len - 1 (a cached prefix, or earlier chunks, come first). The
reference (`kit.ops.paged_attention`) gathers every sequence's blocks into a padded
(num_seqs, max_seq_len) copy and pads the queries to the longest one; this kernel reads
the blocks in place and does no work for padding. How it blocks the work:

* grid (num_q_blocks, num_kv_heads) with num_q_blocks = num_tokens // BLOCK_Q + num_seqs,
  an upper bound on sum_s ceil(q_len_s / BLOCK_Q) that needs no host sync. A program
  finds its sequence by a binary search over query_start_loc (sequence s owns the q-block
  ids from query_start_loc[s] // BLOCK_Q + s on) and exits if it is past that sequence's
  queries (vLLM's unified attention does the same). Programs take the q blocks in reverse
  order, so the long causal rows (late query blocks) are scheduled first;
* GQA packing: the program's BLOCK_M tile rows are (query token, query head of the kv
  head's group) pairs, row r = token r // GROUP, head r % GROUP, so BLOCK_Q = BLOCK_M // GROUP
  tokens share each K/V tile: a K/V element is loaded once for the whole group;
* it walks the keys in tiles of BLOCK_N positions from the first one any of its queries
  sees (0, or the sliding window's start) to its last query's position, loading K and V
  through the block table as the decode kernel does; causal and window masks are applied
  per (row, key), and the online softmax keeps a running max, sum and output in float32;
* 8-bit caches are dequantized in registers exactly as in the decode kernel (per-key K
  scale on the scores, V scale folded into the probabilities).

Decode rows of a mixed batch are sequences with q_len 1 and go through the same kernel.
The grid depends on num_tokens and num_seqs only; `reference_prefill_attention` is the
float32 PyTorch version of the same computation, for tests.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kit.backends.triton_support import LOG2E, QUANTIZED_KV_DTYPES, check_paged_cache, is_pow2, load_triton, \
    next_pow2

# NOTE: set by `_kernel()` on the first call (see triton_support); the kernel reads them as globals.
triton: Any = None
tl: Any = None

__all__ = ["paged_prefill_attention", "reference_prefill_attention", "default_prefill_config"]


def _prefill_tiles(
    acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, kvh, qk_scale, window, lo, hi,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_sb, stride_st, stride_sh, stride_btn,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr, USE_WINDOW: tl.constexpr, KV_QUANT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """The online softmax over key tiles [lo, hi); MASK=False for tiles every query sees in full."""
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n  # (BLOCK_N,)
        ok = pos < hi
        if MASK:
            blk = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btn, mask=ok, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btn).to(tl.int64)
        tok = pos % BLOCK_SIZE
        k_off = blk * stride_kb + tok * stride_kt + kvh * stride_kh  # (BLOCK_N,)
        if MASK:
            k = tl.load(k_ptr + k_off[None, :] + d[:, None] * stride_kd, mask=ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptr + k_off[None, :] + d[:, None] * stride_kd)  # (HEAD_DIM, BLOCK_N)
        if KV_QUANT:
            k = k.to(q.dtype)
        if IEEE_DOT:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s_off = blk * stride_sb + tok * stride_st + kvh * stride_sh
        if KV_QUANT:
            ks = tl.load(ks_ptr + s_off, mask=ok, other=0.0)
            s = s * (ks * qk_scale)[None, :]
        else:
            s = s * qk_scale
        if MASK:
            visible = ok[None, :] & (pos[None, :] <= q_pos[:, None])  # causal
            if USE_WINDOW:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # NOTE: a row may see no key of this tile (padding rows, window starts, the causal
        # corner): keep its max finite so exp2 gives 0, never -inf - -inf = nan
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vb + tok * stride_vt + kvh * stride_vh
        if MASK:
            v = tl.load(v_ptr + v_off[:, None] + d[None, :] * stride_vd, mask=ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + v_off[:, None] + d[None, :] * stride_vd)  # (BLOCK_N, HEAD_DIM)
        if KV_QUANT:
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
    return acc, m_i, l_i


def _varlen_prefill_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, qsl_ptr, sl_ptr, bt_ptr, out_ptr,
    qk_scale, window, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_sb, stride_st, stride_sh,
    stride_btb, stride_btn,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, KV_QUANT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # BLOCK_Q = BLOCK_M // GROUP query tokens per program
    # NOTE: reversed, so the last query blocks of each sequence (the most keys, causal) start first
    # and the short ones fill the tail of the launch
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    # which sequence owns program `pid`: the last s with query_start_loc[s] // BLOCK_Q + s <= pid
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first = (tl.load(qsl_ptr + mid) // BLOCK_Q + mid).to(tl.int32)
        if first <= pid:
            left = mid + 1
        else:
            right = mid
    seq = left - 1
    q_start = tl.load(qsl_ptr + seq).to(tl.int32)
    q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q < q_len:
        seq_len = tl.load(sl_ptr + seq).to(tl.int32)
        context = seq_len - q_len  # tokens cached before this step's queries

        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        qi = q_block * BLOCK_Q + r // GROUP  # (BLOCK_M,) query index within the sequence
        head = kvh * GROUP + r % GROUP  # (BLOCK_M,) query head
        row_ok = (r < BLOCK_Q * GROUP) & (qi < q_len)
        q = tl.load(q_ptr + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh
                    + d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
        q_pos = context + qi  # (BLOCK_M,) positions of the queries

        first_q = context + q_block * BLOCK_Q
        hi = tl.minimum(first_q + BLOCK_Q, seq_len)  # keys [lo, hi): up to the last query's position
        if USE_WINDOW:  # every tile masked (the window's start moves with the row)
            lo = tl.maximum(first_q - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
            full = lo
        else:  # whole tiles before the first query are seen by every row: no mask there
            lo = 0
            full = (first_q // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 domain)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running unnormalised output
        bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
        acc, m_i, l_i = _prefill_tiles(
            acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, kvh, qk_scale, window, lo, full,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            stride_sb, stride_st, stride_sh, stride_btn,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, USE_WINDOW, KV_QUANT, IEEE_DOT)
        acc, m_i, l_i = _prefill_tiles(
            acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, kvh, qk_scale, window, full, hi,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            stride_sb, stride_st, stride_sh, stride_btn,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, USE_WINDOW, KV_QUANT, IEEE_DOT)

        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + qi)[:, None] * stride_ot + head[:, None] * stride_oh
                 + d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


_PREFILL_TILES = _prefill_tiles  # the plain function, JIT-decorated by `_kernel()`


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    global triton, tl
    mods = load_triton()
    if mods is None:
        raise RuntimeError("paged_prefill_attention needs Triton: pip install triton")
    triton, tl = mods
    # NOTE: the kernel calls `_prefill_tiles` by its global name, so the name must hold the JIT function
    globals()["_prefill_tiles"] = triton.jit(_PREFILL_TILES)
    # NOTE: the sequence count and the block-table width change from step to step; specialized (== 1,
    # divisible by 16) they compiled new variants of the kernel in the middle of serving
    return triton.jit(_varlen_prefill_kernel, do_not_specialize=["num_seqs", "stride_btb"])


def _tile_params(block_m: int, head_dim: int) -> dict[str, int]:
    """BLOCK_N / warps / stages that go with `block_m` query rows on a GPU in 16-bit (measured on the H200)."""
    if block_m >= 128:
        return dict(block_n=64, num_warps=8, num_stages=3) if head_dim <= 128 else \
            dict(block_n=32, num_warps=4, num_stages=2)
    if block_m <= 32 and head_dim > 64:
        return dict(block_n=32, num_warps=2, num_stages=3)
    return dict(block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)


def default_prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device, num_tokens: int | None = None,
                           num_seqs: int | None = None, group: int = 1) -> dict[str, int]:
    """BLOCK_M / BLOCK_N / num_warps / num_stages for the prefill kernel (bench/attention.py sweeps these).

    On a GPU: 128 query rows x 64 keys per tile, 8 warps, 3 stages (a bf16 d=128 tile set
    fits shared memory: Q 32 KiB + 3 x (K 16 + V 16) KiB); float32 and the interpreter take
    smaller tiles.

    A batch of mostly decode rows (a mixed step: a prompt chunk beside dozens of sequences
    decoding one token each) gets smaller query tiles. With `num_tokens / num_seqs` <= 4 query
    tokens per sequence on average, BLOCK_M covers about half that many tokens of the GQA
    `group` (a power of two, at least 16 rows and one group); with <= 32, 64 rows; above, 128.
    A decode row alone in a 128-row tile used 4 of its rows (Llama GQA group 4) and the tile's
    128 KiB of shared memory held one program per SM: in an 8B mixed step of 190 tokens over
    63 sequences attention took 59 us a layer, twice the decode kernel's time for the same keys
    (`bench/step_kernels.py`). Measured on the H200 (`bench/attention.py`'s `mixed` sweep, 8B
    shapes): 128 + 62 decodes best at 16 rows x 32 keys, 2 warps, 3 stages (57 -> 28 us);
    1,024 + 63 at 64 x 64, 4 warps, 2 stages (113 -> 79 us); head_dim 64 (1B) prefers 64-key
    tiles and 4 warps at 16 rows.

    NOTE: a mixed-step CUDA graph is captured over static buffers of `max_batch_size + 1`
    sequences, so its tiles follow the bucket's tokens per *slot*, not the step's: a bucket of
    2,048 tokens over 257 slots takes 64-row tiles even when the step is one long prompt chunk
    (twice the K/V reads of 128-row tiles for that chunk; the cap at 64 rows above 4 tokens a
    slot keeps it there).
    """
    if device.type != "cuda":
        return dict(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    rows = 128 if head_dim <= 128 else 64
    if num_tokens and num_seqs:
        per_seq = -(-num_tokens // num_seqs)  # query tokens per sequence, on average (rounded up)
        if per_seq <= 4:  # half the average sequence's rows, at least 16 and one group
            rows = min(rows, max(next_pow2(group * per_seq) // 2, 16, next_pow2(group)))
        elif per_seq <= 32:
            rows = min(rows, max(64, next_pow2(group)))
    return dict(block_m=rows, **_tile_params(rows, head_dim))


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                            block_m: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of packed queries of many sequences over the paged KV cache (Triton).

    q (T, H, D): the queries of every sequence, one after another; query_start_loc
    (num_seqs + 1,) where each sequence's queries begin (the last entry is T); seq_lens
    (num_seqs,) cached tokens after this step, the queries' own included; block_tables
    (num_seqs, max_blocks). The caches are as for `paged_decode_attention` (q's dtype, or
    int8 / fp8 with k_scale / v_scale) and already hold this step's keys and values.
    Query i of sequence s sits at position seq_lens[s] - q_len_s + i and sees the keys up to
    it (the last `sliding_window` of them). Returns (T, H, D) in q's dtype.

    Tuning knobs (default `default_prefill_config`): block_m query rows (tokens x GQA group)
    and block_n keys per tile, num_warps, num_stages.
    """
    check_paged_cache(q, k_cache, v_cache, block_tables, seq_lens, sliding_window, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"query_start_loc must be ({num_seqs + 1},) int32 or int64, "
                         f"got {tuple(query_start_loc.shape)} {query_start_loc.dtype}")
    if query_start_loc.device != q.device:
        raise ValueError(f"query_start_loc must be on {q.device}, got {query_start_loc.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    cfg = default_prefill_config(head_dim, q.dtype, q.device, num_tokens, num_seqs, group)
    if block_m and block_m != cfg["block_m"] and q.device.type == "cuda" and q.dtype != torch.float32:
        cfg.update(_tile_params(block_m, head_dim))  # an explicit block_m: the rest as for that tile
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not is_pow2(value) or value < 16:
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    if block_m < group:
        raise ValueError(f"block_m ({block_m}) must hold at least one token's GQA group of {group} query heads")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    kernel = _kernel()
    quant = k_cache.dtype in QUANTIZED_KV_DTYPES
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # unused pointers when not quantized
    scale_strides = k_scale.stride() if quant else (0, 0, 0)
    block_q = block_m // group
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    kernel[grid](
        q, k_cache, v_cache, ks, vs, query_start_loc, seq_lens, block_tables, out,
        float(scale) * LOG2E, int(sliding_window or 0), num_seqs,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *scale_strides, *block_tables.stride(), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, KV_QUANT=quant, IEEE_DOT=q.dtype == torch.float32,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


def reference_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                                scale: float, sliding_window: int | None = None, *,
                                k_scale: torch.Tensor | None = None,
                                v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_prefill_attention` in plain PyTorch, sequence by sequence in float32 (for tests)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_len = starts[s + 1] - starts[s]
        if q_len == 0:
            continue
        blocks = block_tables[s, : -(-seq_len // block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()  # (L, KVH, D)
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        if k_scale is not None:
            k = k * k_scale[blocks].reshape(-1, num_kv_heads)[:seq_len, :, None]
            v = v * v_scale[blocks].reshape(-1, num_kv_heads)[:seq_len, :, None]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (L, H, D)
        qs = q[starts[s]:starts[s + 1]].float()  # (q_len, H, D)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[starts[s]:starts[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out.to(q.dtype)
