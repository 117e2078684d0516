"""The Triton paged decode attention kernel (`kit/backends/attention_decode.py`) against PyTorch and
`kit.ops.paged_attention`, with bf16/fp16/fp32 and int8/fp8 caches, on the CPU through the Triton
interpreter (small shapes: it runs every program in Python) and on a GPU."""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    # NOTE: read when the kernels are first JIT-decorated, i.e. on the first call.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kit.backends.torch_backend import paged_attention  # noqa: E402
from kit.backends.triton_attention import (  # noqa: E402
    choose_num_splits,
    paged_decode_attention,
    reference_decode_attention,
    triton_available,
)
from kit.engine import ForwardBatch, SequenceInput  # noqa: E402
from kit.quantization.kv_cache import quantize_kv  # noqa: E402

requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")

MIXED_LENS = (1, 2, 15, 16, 17, 64, 65, 130, 300)  # crosses tile (16/32/64) and block borders


def _case(seq_lens, *, num_kv_heads=2, group=1, head_dim=32, block_size=4, dtype=torch.float32,
          extra_blocks=3, seed=0, device="cpu"):
    """Random q and caches; each sequence gets its blocks from a random permutation of the pool."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(counts) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for c in counts:
        tables.append(perm[i:i + c])
        i += c
    max_blocks = max(1, max(counts))
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g)
    as_dev = dict(device=device)
    return dict(
        q=q.to(dtype=dtype, **as_dev), k_cache=k.to(dtype=dtype, **as_dev), v_cache=v.to(dtype=dtype, **as_dev),
        block_tables=block_tables.to(**as_dev), seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
        scale=head_dim ** -0.5, tables=tables,
    )


def _run(fn, c, window=None, **kw):
    return fn(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["scale"], window, **kw)


def _close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------ CPU (interpreter)
@requires_triton
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_matches_reference_on_mixed_lengths(group, block_size):
    c = _case(MIXED_LENS, group=group, block_size=block_size, seed=group * 10 + block_size)
    out = _run(paged_decode_attention, c)
    assert out.shape == c["q"].shape and out.dtype == torch.float32
    _close(out, _run(reference_decode_attention, c))


@requires_triton
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("group,block_size", [(1, 16), (4, 4)])
def test_matches_torch_backend_paged_attention(group, block_size, window):
    c = _case(MIXED_LENS, group=group, block_size=block_size, seed=7)
    batch = ForwardBatch.build([SequenceInput([1], n - 1, t) for n, t in zip(MIXED_LENS, c["tables"])],
                               block_size)
    expected = paged_attention(c["q"], c["k_cache"], c["v_cache"], batch, c["scale"], window)  # (T, H, D)
    out = paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], batch.block_tables, batch.seq_lens,
                                 c["scale"], window)
    _close(out, expected)
    _close(_run(reference_decode_attention, c, window), expected)


@requires_triton
@pytest.mark.parametrize("window", [1, 7, 64, 1000])
def test_sliding_window(window):
    c = _case(MIXED_LENS, group=3, block_size=4, seed=window)
    _close(_run(paged_decode_attention, c, window), _run(reference_decode_attention, c, window))


@requires_triton
def test_window_of_one_returns_the_current_tokens_value():
    c = _case((1, 5, 70), group=2, block_size=4, seed=3)
    out = _run(paged_decode_attention, c, 1)
    for b, n in enumerate((1, 5, 70)):
        blk = c["tables"][b][(n - 1) // 4]
        last_v = c["v_cache"][blk, (n - 1) % 4]  # (KVH, D)
        _close(out[b], last_v.repeat_interleave(2, dim=0))


@requires_triton
@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_k_matches_reference(num_splits, window):
    c = _case(MIXED_LENS, group=4, block_size=16, seed=num_splits)
    out = _run(paged_decode_attention, c, window, num_splits=num_splits, block_n=16)
    _close(out, _run(reference_decode_attention, c, window))


@requires_triton
@pytest.mark.parametrize("window", [None, 20])
def test_splits_share_each_sequences_own_keys(window):
    """Each program divides its own sequence's keys among the splits (whole tiles): short contexts in a wide
    block table (a graph captured for long ones) still spread over several splits, and every key is
    counted once, whatever the split count."""
    lens = (3, 17, 40, 64, 65)
    c = _case(lens, group=2, block_size=4, seed=11)
    bt = c["block_tables"]
    wide = torch.cat([bt, torch.zeros(len(lens), 200, dtype=bt.dtype)], dim=1)  # 800+ slots
    ref = _run(reference_decode_attention, c, window)
    for splits in (1, 4, 16, 50):
        out = paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], wide, c["seq_lens"], c["scale"], window,
                                     num_splits=splits, block_n=16)
        _close(out, ref)


@requires_triton
@pytest.mark.parametrize("window", [None, 20])
def test_which_splits_hold_keys(window, monkeypatch):
    """The partials the merge kernel receives: a 40-token row in a 400-slot table, 4 splits of whole 16-key
    tiles, gives keys to splits 0-2 (16, 16, 8 keys) and none to split 3; with a window of 20 the keys
    20..39 go to splits 0-1 (16 and 4). Fixed ranges of the table's width would give every key to split 0."""
    from kit.backends import attention_decode

    decode_kernel, merge_kernel = attention_decode._kernels()
    seen = {}

    class Spy:
        def __getitem__(self, grid):
            def launch(m_part, l_part, *args, **kw):
                seen["l"] = l_part.clone()  # (B, H, num_splits): the running sums, 0 for a split with no key
                return merge_kernel[grid](m_part, l_part, *args, **kw)
            return launch

    monkeypatch.setattr(attention_decode, "_kernels", lambda: (decode_kernel, Spy()))
    c = _case((40,), group=2, block_size=4, seed=5)
    wide = torch.cat([c["block_tables"], torch.zeros(1, 90, dtype=c["block_tables"].dtype)], dim=1)  # 400 slots
    out = paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], wide, c["seq_lens"], c["scale"], window,
                                 num_splits=4, block_n=16)
    _close(out, _run(reference_decode_attention, c, window))
    holds = (seen["l"][0, 0] > 0).tolist()
    assert holds == ([True, True, True, False] if window is None else [True, True, False, False])


@requires_triton
def test_default_splits_a_long_context_of_few_sequences():
    assert choose_num_splits(1, 1, 608, 132) == 4  # limited by MIN_SPLIT_TOKENS (128)
    assert choose_num_splits(1, 8, 256, 132) == 2 and choose_num_splits(1, 8, 2048, 132) == 16
    assert choose_num_splits(1, 8, 32768, 132) == 33  # ~2 waves of programs
    assert choose_num_splits(2, 1, 100_000, 132) == 64  # MAX_SPLITS
    assert choose_num_splits(64, 8, 32768, 132) == 1  # already 512 programs
    # an 8-bit cache: a second split of long tables while the programs fill fewer than 8 waves
    assert choose_num_splits(64, 8, 2048, 132, quantized=True) == 2
    assert choose_num_splits(64, 8, 256, 132, quantized=True) == 1  # short tables: no gain
    assert choose_num_splits(256, 8, 8192, 132, quantized=True) == 1  # 2,048 programs: enough
    assert choose_num_splits(1, 8, 2048, 132, quantized=True) == 16  # few programs: as for 16-bit caches
    assert choose_num_splits(4, 2, 127, 132) == 1  # too short to split
    c = _case((600, 3), num_kv_heads=1, group=3, block_size=16, seed=5)  # default: 4 splits
    _close(_run(paged_decode_attention, c), _run(reference_decode_attention, c))


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 2])
def test_empty_and_padding_rows(num_splits):
    """seq_len 0 writes zeros; a CUDA-graph padding row (seq_len 1, block 0) reads slot 0."""
    c = _case((0, 1, 40, 0), group=3, block_size=4, seed=11)
    c["block_tables"][1] = 0  # the padding row points at block 0
    out = _run(paged_decode_attention, c, num_splits=num_splits, block_n=16)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[3], torch.zeros_like(out[3]))
    _close(out[1], c["v_cache"][0, 0].repeat_interleave(3, dim=0))
    _close(out, _run(reference_decode_attention, c))


@requires_triton
def test_fp16_matches_reference():
    # NOTE: the interpreter computes float16 dots but not bfloat16 ones; bf16 is a GPU test.
    c = _case(MIXED_LENS, group=4, block_size=16, dtype=torch.float16, seed=2)
    out = _run(paged_decode_attention, c)  # the 16-bit path: BLOCK_N 64, p cast to fp16
    assert out.dtype == torch.float16
    _close(out, _run(reference_decode_attention, c), atol=5e-3, rtol=1e-2)


@requires_triton
def test_layer_of_a_pool_strided_q_int32_tables_and_out():
    c = _case((5, 33, 77), num_kv_heads=2, group=4, head_dim=64, block_size=8, seed=4)
    pool_k = torch.randn(3, *c["k_cache"].shape)  # (L, NB, BS, KVH, D)
    pool_v = torch.randn(3, *c["v_cache"].shape)
    pool_k[1], pool_v[1] = c["k_cache"], c["v_cache"]
    qkv = torch.randn(3, 3 * 8 * 64)
    q = qkv[:, : 8 * 64].view(3, 8, 64)  # a non-contiguous slice, as the fused qkv projection gives
    q.copy_(c["q"])
    out = torch.full_like(c["q"], float("nan"))
    got = paged_decode_attention(q, pool_k[1], pool_v[1], c["block_tables"].int(), c["seq_lens"].int(),
                                 c["scale"], None, out)
    assert got is out
    _close(out, _run(reference_decode_attention, c))


def _quantized(c, kv):
    """The case's caches quantized to int8 / fp8, with their (num_blocks, block_size, KVH) scales."""
    (k, ks), (v, vs) = quantize_kv(c["k_cache"], kv), quantize_kv(c["v_cache"], kv)
    return {**c, "k_cache": k, "v_cache": v, "k_scale": ks, "v_scale": vs}


def _run_q(fn, c, window=None, **kw):
    return _run(fn, c, window, k_scale=c["k_scale"], v_scale=c["v_scale"], **kw)


@requires_triton
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_cache_matches_ops_paged_attention(kv, window, num_splits):
    c = _quantized(_case(MIXED_LENS, group=4, block_size=16, seed=21), kv)
    batch = ForwardBatch.build([SequenceInput([1], n - 1, t) for n, t in zip(MIXED_LENS, c["tables"])], 16)
    expected = paged_attention(c["q"], c["k_cache"], c["v_cache"], batch, c["scale"], window,
                               kv_scales=(c["k_scale"], c["v_scale"]))
    out = paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], batch.block_tables, batch.seq_lens,
                                 c["scale"], window, k_scale=c["k_scale"], v_scale=c["v_scale"],
                                 num_splits=num_splits, block_n=16)
    _close(out, expected)
    _close(_run_q(reference_decode_attention, c, window), expected)


@requires_triton
@pytest.mark.parametrize("group,block_size", [(1, 32), (8, 16), (8, 32)])
def test_gqa_ratios_and_block_sizes_match_ops_paged_attention(group, block_size):
    c = _case(MIXED_LENS, group=group, block_size=block_size, seed=group * block_size)
    batch = ForwardBatch.build([SequenceInput([1], n - 1, t) for n, t in zip(MIXED_LENS, c["tables"])],
                               block_size)
    expected = paged_attention(c["q"], c["k_cache"], c["v_cache"], batch, c["scale"])
    _close(_run(paged_decode_attention, c), expected)


@requires_triton
def test_quantized_empty_and_padding_rows():
    c = _quantized(_case((0, 1, 40), group=2, block_size=4, seed=12), "int8")
    c["block_tables"][1] = 0
    out = _run_q(paged_decode_attention, c, num_splits=2, block_n=16)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    _close(out[1], (c["v_cache"][0, 0].float() * c["v_scale"][0, 0, :, None]).repeat_interleave(2, dim=0))


def test_rejects_a_quantized_cache_without_scales():
    q = torch.randn(2, 4, 16)
    k = torch.zeros(4, 4, 2, 16, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        paged_decode_attention(q, k, k, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long), 1.0)
    bad = torch.ones(4, 4, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="k_scale must be"):
        paged_decode_attention(q, k, k, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long), 1.0,
                               k_scale=bad, v_scale=bad)


@pytest.mark.parametrize("change,match", [
    (dict(head_dim=48), "head_dim must be a power of two"),
    (dict(q_heads=5), "multiple of num_kv_heads"),
    (dict(block_size=3), "block_size must be a power of two"),
    (dict(cache_dtype=torch.float16), "share a dtype"),
    (dict(window=0), "sliding_window"),
])
def test_rejects_bad_inputs(change, match):
    d = change.get("head_dim", 32)
    q = torch.randn(2, change.get("q_heads", 4), d)
    k = torch.randn(4, change.get("block_size", 4), 2, d, dtype=change.get("cache_dtype", torch.float32))
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(q, k, k.clone(), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long),
                               1.0, change.get("window"))


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import kit.backends.triton_attention as m\n"
            "assert not m.triton_available()\n"
            "import torch\n"
            "q = torch.zeros(1, 1, 16); k = torch.zeros(1, 1, 1, 16); t = torch.zeros(1, 1, dtype=torch.long)\n"
            "try:\n    m.paged_decode_attention(q, k, k, t, t[0], 1.0)\n"
            "except RuntimeError as e:\n    assert 'pip install triton' in str(e)\n"
            "else:\n    raise SystemExit('expected a RuntimeError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------ GPU
@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("head_dim,num_kv_heads,group", [(64, 4, 1), (128, 8, 4), (128, 2, 3), (128, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype, head_dim, num_kv_heads, group, num_splits):
    lens = (1, 17, 64, 300, 1025, 4000, 0, 2222)
    c = _case(lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=16, dtype=dtype,
              seed=head_dim + group, device="cuda")
    for window in (None, 500):
        out = _run(paged_decode_attention, c, window, num_splits=num_splits)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        _close(out, _run(reference_decode_attention, c, window), atol=tol, rtol=2e-2)


@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_gpu_block_sizes(block_size):
    c = _case(MIXED_LENS, num_kv_heads=8, group=4, head_dim=128, block_size=block_size, dtype=torch.bfloat16,
              device="cuda")
    _close(_run(paged_decode_attention, c), _run(reference_decode_attention, c), atol=1e-2, rtol=2e-2)


@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [3, 64])  # few sequences: split-K; many: one split
def test_gpu_cuda_graph_replays_with_new_seq_lens(num_seqs):
    torch.manual_seed(0)
    kvh, group, d, bs, max_blocks = 8, 4, 128, 16, 256  # 4096-token tables
    num_blocks = num_seqs * max_blocks
    dev, dt = "cuda", torch.bfloat16
    k_cache = torch.randn(num_blocks, bs, kvh, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(num_seqs, kvh * group, d, device=dev, dtype=dt)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.long, device=dev)
    seq_lens = torch.zeros(num_seqs, dtype=torch.long, device=dev)
    out = torch.empty_like(q)
    scale = d ** -0.5

    def step():
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, None, out)

    def fill(lens):
        perm = torch.randperm(num_blocks, device=dev)
        tables.copy_(perm.view(num_seqs, max_blocks))
        seq_lens.copy_(torch.tensor(lens, device=dev))
        q.copy_(torch.randn_like(q))

    fill([1] * num_seqs)
    stream = torch.cuda.Stream()  # warm up (JIT compile) outside the capture
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    g = torch.Generator().manual_seed(1)
    for lens in ([1] * num_seqs, torch.randint(0, 4097, (num_seqs,), generator=g).tolist(),
                 [4096] * num_seqs, ([0, 1] * num_seqs)[:num_seqs]):
        fill(lens)
        graph.replay()
        expected = reference_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)
        _close(out, expected, atol=1e-2, rtol=2e-2)


@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("kv", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_quantized_cache_matches_reference(dtype, kv, num_splits):
    lens = (1, 17, 64, 300, 1025, 8000, 0, 2222)
    c = _quantized(_case(lens, num_kv_heads=8, group=4, head_dim=128, block_size=16, dtype=dtype, seed=31,
                         device="cuda"), kv)
    for window in (None, 500):
        out = _run_q(paged_decode_attention, c, window, num_splits=num_splits)
        _close(out, _run_q(reference_decode_attention, c, window), atol=2e-2, rtol=2e-2)


@requires_triton
@pytest.mark.gpu
def test_gpu_quantized_cuda_graph_replays_with_new_seq_lens():
    c = _quantized(_case((1, 2, 3), num_kv_heads=8, group=4, head_dim=128, block_size=16, dtype=torch.bfloat16,
                         extra_blocks=600, device="cuda"), "int8")
    tables = torch.randperm(c["k_cache"].shape[0], device="cuda")[:3 * 200].view(3, 200).contiguous()
    seq_lens = torch.ones(3, dtype=torch.long, device="cuda")
    out = torch.empty_like(c["q"])

    def step():
        paged_decode_attention(c["q"], c["k_cache"], c["v_cache"], tables, seq_lens, c["scale"], None, out,
                               k_scale=c["k_scale"], v_scale=c["v_scale"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lens in ([1, 2, 3], [3200, 17, 0], [3200, 3200, 3200]):
        seq_lens.copy_(torch.tensor(lens, device="cuda"))
        graph.replay()
        ref = reference_decode_attention(c["q"], c["k_cache"], c["v_cache"], tables, seq_lens, c["scale"],
                                         k_scale=c["k_scale"], v_scale=c["v_scale"])
        _close(out, ref, atol=2e-2, rtol=2e-2)
