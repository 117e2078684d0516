"""The Triton varlen paged prefill kernel (`kit/backends/attention_prefill.py`) against the model's
reference `kit.ops.paged_attention`: prompt chunks with cached prefixes, mixed chunk + decode batches,
GQA, sliding windows, int8 / fp8 caches; on the CPU through Triton's interpreter, on a GPU at real sizes."""

import torch

import pytest

from kit.backends.triton_attention import (
    paged_prefill_attention,
    reference_prefill_attention,
    triton_available,
)
from kit.batch import ForwardBatch, SequenceInput
from kit.ops import paged_attention
from kit.quantization.kv_cache import quantize_kv

requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")

# (tokens computed this step, tokens cached before them): prompts, chunks after a cached prefix, decode rows
MIXED = ((9, 0), (1, 40), (23, 17), (1, 0), (16, 16), (3, 70), (1, 5))


def _case(steps, *, num_kv_heads=2, group=4, head_dim=16, block_size=16, dtype=torch.float32, kv=None,
          seed=0, device="cpu"):
    """Random q and paged caches; each sequence's blocks come from a random permutation of the pool."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-(n + c) // block_size) for n, c in steps]
    num_blocks = sum(counts) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for c in counts:
        tables.append(perm[i:i + c])
        i += c
    batch = ForwardBatch.build([SequenceInput([0] * n, c, t) for (n, c), t in zip(steps, tables)], block_size,
                               device=device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=g).to(device)
    v = torch.randn(shape, generator=g).to(device)
    q = torch.randn(batch.num_tokens, num_kv_heads * group, head_dim, generator=g).to(device=device, dtype=dtype)
    scales = None
    if kv is None:
        k, v = k.to(dtype), v.to(dtype)
    else:
        (k, ks), (v, vs) = quantize_kv(k, kv), quantize_kv(v, kv)
        scales = (ks, vs)
    return dict(q=q, k=k, v=v, batch=batch, scales=scales, scale=head_dim ** -0.5)


def _kernel(c, window=None, **kw):
    b, s = c["batch"], c["scales"] or (None, None)
    return paged_prefill_attention(c["q"], c["k"], c["v"], b.query_start_loc, b.seq_lens, b.block_tables,
                                   c["scale"], window, k_scale=s[0], v_scale=s[1], **kw)


def _ops(c, window=None):
    return paged_attention(c["q"], c["k"], c["v"], c["batch"], c["scale"], window, kv_scales=c["scales"])


def _close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------ CPU (interpreter)
@requires_triton
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_mixed_batch_matches_ops_paged_attention(group, block_size):
    c = _case(MIXED, group=group, block_size=block_size, seed=group + block_size)
    out = _kernel(c)
    assert out.shape == c["q"].shape and out.dtype == torch.float32
    _close(out, _ops(c))


@requires_triton
@pytest.mark.parametrize("window", [1, 5, 24, 1000])
def test_sliding_window(window):
    c = _case(MIXED, group=3, block_size=16, seed=window)
    _close(_kernel(c, window), _ops(c, window))


@requires_triton
@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_cache_matches_ops_paged_attention(kv, window):
    c = _case(MIXED, group=4, block_size=16, kv=kv, seed=3)
    assert c["k"].dtype == (torch.int8 if kv == "int8" else torch.float8_e4m3fn)
    _close(_kernel(c, window), _ops(c, window))
    b, (ks, vs) = c["batch"], c["scales"]
    ref = reference_prefill_attention(c["q"], c["k"], c["v"], b.query_start_loc, b.seq_lens, b.block_tables,
                                      c["scale"], window, k_scale=ks, v_scale=vs)
    _close(ref, _ops(c, window))


@requires_triton
@pytest.mark.parametrize("block_m", [16, 32])
def test_query_blocks_at_and_across_tile_borders(block_m):
    """q_len == BLOCK_Q, BLOCK_Q + 1, 2 * BLOCK_Q - 1 and 1: the program-to-sequence search and the exits."""
    block_q = block_m // 2  # group 2
    steps = ((block_q, 0), (block_q + 1, 3), (1, 0), (2 * block_q - 1, 30), (1, 1), (block_q, block_q))
    c = _case(steps, num_kv_heads=3, group=2, block_size=16, seed=block_m)
    _close(_kernel(c, block_m=block_m, block_n=16), _ops(c))


@requires_triton
def test_prompt_in_chunks_equals_whole_prompt():
    """A 40-token prompt computed at once and as chunks of 16/16/8 after the cached prefix: same rows."""
    whole = _case(((40, 0),), group=4, block_size=16, seed=9)
    out = _kernel(whole)
    b = whole["batch"]
    table = b.block_tables[0].tolist()
    for lo, hi in ((0, 16), (16, 32), (32, 40)):
        chunk = ForwardBatch.build([SequenceInput([0] * (hi - lo), lo, table)], 16)
        got = paged_prefill_attention(whole["q"][lo:hi], whole["k"], whole["v"], chunk.query_start_loc,
                                      chunk.seq_lens, chunk.block_tables, whole["scale"])
        _close(got, out[lo:hi])


@requires_triton
def test_fp16_matches_reference():
    c = _case(MIXED, group=4, block_size=16, dtype=torch.float16, seed=2)
    out = _kernel(c)
    assert out.dtype == torch.float16
    b = c["batch"]
    ref = reference_prefill_attention(c["q"], c["k"], c["v"], b.query_start_loc, b.seq_lens, b.block_tables,
                                      c["scale"])
    _close(out, ref, atol=5e-3, rtol=1e-2)


@requires_triton
def test_strided_q_int32_indices_and_out():
    c = _case(MIXED, num_kv_heads=2, group=2, head_dim=32, block_size=16, seed=4)
    t, h, d = c["q"].shape
    qkv = torch.randn(t, 2 * h * d)
    q = qkv[:, : h * d].view(t, h, d)  # a non-contiguous slice, as the fused qkv projection gives
    q.copy_(c["q"])
    out = torch.full_like(c["q"], float("nan"))
    b = c["batch"]
    got = paged_prefill_attention(q, c["k"], c["v"], b.query_start_loc.int(), b.seq_lens.int(),
                                  b.block_tables.int(), c["scale"], None, out)
    assert got is out
    _close(out, _ops(c))


@pytest.mark.parametrize("change,match", [
    (dict(block_m=8), "block_m must be a power of two >= 16"),
    (dict(block_n=24), "block_n must be a power of two >= 16"),
    (dict(qsl=torch.tensor([0, 3])), "query_start_loc must be"),
    (dict(window=-1), "sliding_window"),
    (dict(scales=True), "k_scale / v_scale belong to an int8 or float8_e4m3fn cache"),
])
def test_rejects_bad_inputs(change, match):
    q = torch.randn(3, 4, 16)
    k = torch.randn(4, 4, 2, 16)
    s = torch.ones(4, 4, 2) if change.get("scales") else None
    qsl = change.get("qsl", torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(q, k, k.clone(), qsl, torch.tensor([2, 1]), torch.zeros(2, 1, dtype=torch.long),
                                1.0, change.get("window"), k_scale=s, v_scale=s,
                                block_m=change.get("block_m"), block_n=change.get("block_n"))


def test_block_m_must_hold_a_group():
    q = torch.randn(1, 32, 16)
    k = torch.randn(2, 4, 1, 16)
    with pytest.raises(ValueError, match="GQA group of 32"):
        paged_prefill_attention(q, k, k, torch.tensor([0, 1]), torch.tensor([1]), torch.zeros(1, 1, dtype=torch.long),
                                1.0, block_m=16)


def test_quantized_cache_needs_scales():
    q = torch.randn(1, 2, 16)
    k = torch.zeros(2, 4, 1, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        paged_prefill_attention(q, k, k, torch.tensor([0, 1]), torch.tensor([1]), torch.zeros(1, 1, dtype=torch.long),
                                1.0)


# ------------------------------------------------------------------------------ GPU
GPU_MIXED = ((700, 0), (1, 2047), (333, 1200), (1, 5), (64, 64), (1, 4000), (1024, 0), (17, 3))


@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("kv", [None, "int8", "fp8"])
@pytest.mark.parametrize("head_dim,num_kv_heads,group,block_size", [(128, 8, 4, 16), (64, 2, 7, 32),
                                                                    (128, 4, 1, 16), (64, 3, 3, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype, head_dim, num_kv_heads, group, block_size, kv):
    c = _case(GPU_MIXED, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size,
              dtype=dtype, kv=kv, seed=head_dim + group, device="cuda")
    b, (ks, vs) = c["batch"], c["scales"] or (None, None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for window in (None, 300):
        ref = reference_prefill_attention(c["q"], c["k"], c["v"], b.query_start_loc, b.seq_lens, b.block_tables,
                                          c["scale"], window, k_scale=ks, v_scale=vs)
        _close(_kernel(c, window), ref, atol=tol, rtol=2e-2)
        if dtype == torch.float32:
            _close(_ops(c, window), ref, atol=tol, rtol=2e-2)


# a mixed step: a prompt chunk beside decode rows (the default tiles are small: <= 4 tokens a sequence),
# and one with more tokens a sequence (64-row tiles)
GPU_DECODE_HEAVY = ((128, 0),) + tuple((1, 40 + 37 * i) for i in range(60))
GPU_MEDIUM = ((600, 100),) + tuple((1, 300 + i) for i in range(30))


@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("steps", [GPU_DECODE_HEAVY, GPU_MEDIUM], ids=["decode-heavy", "medium"])
@pytest.mark.parametrize("head_dim,num_kv_heads,group", [(128, 8, 4), (64, 8, 4), (64, 2, 7), (256, 2, 4)])
def test_gpu_default_tiles_of_mixed_steps_match_reference(steps, head_dim, num_kv_heads, group):
    """The kernel with the tiles `default_prefill_config` picks for mixed steps (16-64 rows, 2-4 warps),
    compiled for a GPU, over GQA groups 4 and 7 and heads of 64, 128 and 256, in bf16."""
    from kit.backends.triton_attention import default_prefill_config

    c = _case(steps, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=16,
              dtype=torch.bfloat16, seed=head_dim * group, device="cuda")
    b = c["batch"]
    cfg = default_prefill_config(head_dim, torch.bfloat16, torch.device("cuda"), b.num_tokens, b.num_seqs, group)
    assert cfg["block_m"] < 128  # the small-tile path is what runs here
    ref = reference_prefill_attention(c["q"], c["k"], c["v"], b.query_start_loc, b.seq_lens, b.block_tables,
                                      c["scale"])
    _close(_kernel(c), ref, atol=2e-2, rtol=2e-2)


def test_mostly_decode_batches_get_query_tiles_near_their_tokens_per_sequence():
    """A mixed step (a prompt chunk beside many decode rows) takes small query tiles on a GPU: ~ half its
    average tokens per sequence x the GQA group, at least 16 rows and one group, up to 4 tokens a sequence;
    64 rows up to 32 tokens a sequence; long prompts keep 128 rows."""
    from kit.backends.triton_attention import default_prefill_config

    gpu = torch.device("cuda")
    big = default_prefill_config(128, torch.bfloat16, gpu)
    assert big["block_m"] == 128
    rows = {(t, n, g): default_prefill_config(128, torch.bfloat16, gpu, t, n, group=g)["block_m"]
            for t, n, g in ((190, 63, 4), (192, 65, 7), (1087, 64, 4), (700, 64, 4))}
    # <= 4 tokens a sequence: half of 4 x 4 -> 16 rows, of 3 x 7 = 21 -> 16; 5..32 tokens: 64 rows
    assert rows == {(190, 63, 4): 16, (192, 65, 7): 16, (1087, 64, 4): 64, (700, 64, 4): 64}
    assert default_prefill_config(128, torch.bfloat16, gpu, 2048, 257, group=4)["block_m"] == 64  # capped
    assert default_prefill_config(256, torch.bfloat16, gpu)["block_m"] == 64  # large heads: smaller tiles
    assert default_prefill_config(128, torch.bfloat16, gpu, 190, 63, group=4)["num_warps"] == 2
    assert default_prefill_config(128, torch.bfloat16, gpu, 4096, 4, group=4) == big  # whole prompts
    for t, n, g in ((5, 5, 32), (64, 64, 16), (300, 70, 8)):
        cfg = default_prefill_config(64, torch.bfloat16, gpu, t, n, group=g)
        assert cfg["block_m"] >= g and cfg["block_m"] & (cfg["block_m"] - 1) == 0
    assert default_prefill_config(128, torch.bfloat16, torch.device("cpu"), 190, 63, group=4)["block_m"] == 32
    from kit.backends.attention_prefill import _tile_params

    # an explicit block_m takes the warps and stages of its own tile, not of the default's
    assert _tile_params(128, 128) == {"block_n": 64, "num_warps": 8, "num_stages": 3}
    assert _tile_params(16, 128) == {"block_n": 32, "num_warps": 2, "num_stages": 3}


@requires_triton
def test_small_query_tiles_on_a_mostly_decode_batch():
    """16-row tiles (4 tokens of a group of 4) over a chunk beside decode rows: the reference's rows."""
    steps = ((37, 0),) + tuple((1, 20 + 7 * i) for i in range(9))
    c = _case(steps, num_kv_heads=2, group=4, block_size=16, seed=3)
    _close(_kernel(c, block_m=16, block_n=16), _ops(c))
