"""Paged decode attention in Triton: one query token per sequence over the paged KV cache.

The decode step of a batch reads, for every sequence, all of its cached keys and
values once; attention there is bound by memory bandwidth, not by FLOPs. This kernel
follows vLLM's paged attention and flash-decoding:

* one program per (sequence, kv head, split) loads the whole GQA group of query heads
  that share the kv head, as a (group_padded, head_dim) tile (the group is padded to 16
  rows for `tl.dot`), so each K/V element is read from memory once per group;
* it walks its share of the sequence in tiles of BLOCK_N tokens, finding each token's
  physical slot through the block table
  (slot = block_tables[b, pos // block_size] * block_size + pos % block_size),
  and keeps an online softmax in float32 (exp2, with log2(e) folded into the scale);
* for long contexts and few (sequence, kv head) pairs the sequence is cut into
  `num_splits` splits (flash-decoding); each split writes its running max, sum and
  unnormalised output in float32, and a second kernel merges them per (sequence, head).

The launch grid depends only on tensor shapes (the split count is chosen from the width
of the block table, not from `seq_lens`), and `seq_lens` is read inside the kernel, so
the call is free of host synchronisation and can be captured in a CUDA graph. A row
with seq_len 0 writes zeros; a padding row with seq_len 1 pointing at block 0 reads
slot 0 and is equally harmless.

`reference_decode_attention` is the same computation in plain PyTorch (float32), for
tests. Triton is optional: this module imports without it (`triton_available()`), and
the kernels are only JIT-decorated on the first call, so `TRITON_INTERPRET=1` set
before that call runs them on the CPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# NOTE: the kit's default CPU install has no triton; only the kernels need it. It is imported on
# first use (`_import_triton`), not with this module: the PyTorch backend imports this module, and
# triton must not be imported before a test or notebook sets TRITON_INTERPRET=1.
triton: Any = None
tl: Any = None

__all__ = ["choose_num_splits", "paged_decode_attention", "reference_decode_attention", "triton_available"]

LOG2E = 1.4426950408889634
# Split heuristic (flash-decoding): split only while (sequence, kv head) programs fill
# fewer than SPLIT_TARGET_WAVES x the SMs, and keep at least MIN_SPLIT_TOKENS per split.
SPLIT_TARGET_WAVES = 2
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
NUM_WARPS = 4
NUM_STAGES = 2


def _import_triton() -> bool:
    """Import triton (and triton.language as `tl`, which the kernels read) once; False if absent."""
    global triton, tl
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as language
        except ImportError:
            return False
        triton, tl = triton_module, language
    return True


def triton_available() -> bool:
    """Whether Triton can be imported (running the kernel also needs CUDA tensors,
    or TRITON_INTERPRET=1 set before the first call for CPU tensors)."""
    return _import_triton()


# ------------------------------------------------------------------------------ kernels
# Plain functions, JIT-decorated lazily by `_kernels()` (see the module docstring).

def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, window, split_size,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, seq_len)  # this split covers positions [lo, hi)
    if USE_WINDOW:
        lo = tl.maximum(lo, seq_len - window)

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
        blk = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btn, mask=ok, other=0)  # int64
        tok = pos % BLOCK_SIZE
        k_off = blk * stride_kb + tok * stride_kt + kvh * stride_kh  # (BLOCK_N,)
        k = tl.load(k_ptr + k_off[None, :] + d[:, None] * stride_kd,
                    mask=ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        if IEEE_DOT:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))  # (GROUP_PAD, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vb + tok * stride_vt + kvh * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :] * stride_vd,
                    mask=ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
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
    if not _import_triton():
        raise RuntimeError("paged_decode_attention needs Triton: pip install triton")
    return triton.jit(_paged_decode_kernel), triton.jit(_merge_splits_kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM, so the interpreter exercises the same choices


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Flash-decoding split count from shapes only (never from seq_lens)."""
    programs = num_seqs * num_kv_heads
    if programs >= SPLIT_TARGET_WAVES * num_sms:
        return 1
    wanted = -(-SPLIT_TARGET_WAVES * num_sms // programs)
    return max(1, min(wanted, max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))


# ------------------------------------------------------------------------------ wrappers
def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, sliding_window: int | None, out: torch.Tensor | None) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (num_seqs, num_heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_dim}) differ")
    if not _is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 (64, 128, ...), got {head_dim}")
    if not _is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.shape[1] < 1:
        raise ValueError(f"block_tables must be ({num_seqs}, max_blocks >= 1), got {tuple(block_tables.shape)}")
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be ({num_seqs},), got {tuple(seq_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be None or > 0, got {sliding_window}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if out is not None:
        devices.add(out.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, out: torch.Tensor | None = None, *,
                           num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV cache (Triton).

    q (B, H, D); k_cache / v_cache (num_blocks, block_size, KVH, D), already holding the
    current token; block_tables (B, max_blocks); seq_lens (B,) cached tokens including
    the current one. Sequence b's query sits at position seq_lens[b] - 1 and sees keys
    0 .. seq_lens[b] - 1, or only the last `sliding_window` of them. Returns (B, H, D)
    in q's dtype (into `out` when given). Any strides are accepted.

    `num_splits` (default: `choose_num_splits` from the shapes) and `block_n` (tokens per
    tile, default 64 for 16-bit dtypes and 32 for float32) are tuning knobs; both are
    fixed by shapes, so a CUDA graph replays with any seq_lens.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, sliding_window, out)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    decode_kernel, merge_kernel = _kernels()
    group = num_heads // num_kv_heads
    block_n = block_n or (64 if q.element_size() <= 2 else 32)
    if not _is_pow2(block_n) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, _num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # splits of a whole number of tiles; the last one may be shorter
    split_size = -(-max_context // num_splits)
    split_size = -(-split_size // block_n) * block_n
    num_splits = -(-max_context // split_size)

    split = num_splits > 1
    if split:  # (B, H, num_splits[, D]) float32 partials
        m_part = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        m_part = l_part = acc_part = out  # unused
    decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, m_part, l_part, acc_part,
        float(scale) * LOG2E, int(sliding_window or 0), split_size,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None, SPLIT=split, IEEE_DOT=q.dtype == torch.float32,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if split:
        merge_kernel[(num_seqs, num_heads)](
            m_part, l_part, acc_part, out, num_splits, *out.stride(),
            HEAD_DIM=head_dim, SPLITS_PAD=_next_pow2(num_splits), num_warps=NUM_WARPS,
        )
    return out


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_decode_attention` in plain PyTorch, computed in float32 (for tests)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    tables = block_tables.long()
    k = k_cache[tables].reshape(num_seqs, max_context, num_kv_heads, head_dim).float()  # (B, L, KVH, D)
    v = v_cache[tables].reshape(num_seqs, max_context, num_kv_heads, head_dim).float()
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
