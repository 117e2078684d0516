"""KVCacheManager / KVCacheInspector: exact block ids, prefix reuse, eviction, invariants."""

import random

import pytest
import torch

from kit.kv_cache import KVCacheInspector, KVCacheManager, gpu_memory_budget, hash_block_tokens
from kit.request import Request


def make(rid, tokens, max_tokens=4):
    return Request(rid, list(tokens), max_tokens=max_tokens)


def compute(kv, req, n, computed_blocks=None):
    """What the scheduler + a forward pass do: allocate n slots, mark them computed, hash full blocks."""
    new = kv.allocate_slots(req, n, computed_blocks)
    assert new is not None
    if computed_blocks:
        req.num_computed_tokens = len(computed_blocks) * kv.block_size
    req.num_computed_tokens += n
    kv.cache_full_blocks(req)
    kv.check_invariants()
    return new.block_ids


def _lookup(kv, req):
    """The prefix-cache lookup as (block ids, tokens)."""
    blocks, n = kv.get_computed_blocks(req)
    return blocks.block_ids, n


def test_allocate_and_free_exact_block_ids():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make("a", range(10)), make("b", range(5))
    assert kv.allocate_slots(a, 10).block_ids == [0, 1, 2]
    assert kv.allocate_slots(b, 5).block_ids == [3, 4]
    assert kv.block_table("a") == [0, 1, 2] and kv.num_free_blocks == 3 and kv.num_used_blocks == 5
    assert kv.usage == pytest.approx(5 / 8)
    kv.free(a)
    kv.check_invariants()
    assert kv.block_table("a") == [] and not kv.has_request("a") and kv.num_free_blocks == 6
    c = make("c", range(16))
    assert kv.allocate_slots(c, 16).block_ids == [5, 6, 7, 2]  # never-used blocks first, then a's, tail first
    assert kv.allocate_slots(make("d", [1]), 1).block_ids == [1]
    kv.free("b"), kv.free("c"), kv.free("d")
    kv.check_invariants()
    assert kv.num_free_blocks == 8 and kv.num_used_blocks == 0


def test_incremental_allocation_only_adds_missing_blocks():
    kv = KVCacheManager(8, 4)
    r = make("r", range(10))
    assert kv.allocate_slots(r, 10).block_ids == [0, 1, 2]
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 1).block_ids == []  # slot 10 lives in block 2
    assert kv.allocate_slots(r, 2).block_ids == []  # slots 10, 11
    r.num_computed_tokens = 12
    assert kv.allocate_slots(r, 1).block_ids == [3]
    assert kv.allocate_slots(r, 0).block_ids == []
    assert kv.block_table("r") == [0, 1, 2, 3]
    kv.check_invariants()
    with pytest.raises(ValueError, match="num_new_tokens"):
        kv.allocate_slots(r, -1)


def test_decode_inside_the_last_block_allocates_nothing_even_from_a_full_pool():
    kv = KVCacheManager(2, 4)
    r = make("r", range(5))
    assert kv.allocate_slots(r, 5).block_ids == [0, 1] and kv.num_free_blocks == 0
    for computed in (5, 6, 7):  # slots 5, 6, 7 live in block 1: no block is needed, none is free
        r.num_computed_tokens = computed
        new = kv.allocate_slots(r, 1)
        assert new is not None and new.block_ids == [] and kv.block_table("r") == [0, 1]
        kv.check_invariants()
    r.num_computed_tokens = 8
    assert kv.allocate_slots(r, 1) is None  # slot 8 needs a third block
    assert kv.block_table("r") == [0, 1]
    kv.check_invariants()


def test_not_enough_blocks_returns_none_and_changes_nothing():
    kv = KVCacheManager(4, 4)
    a = make("a", range(12))
    assert kv.allocate_slots(a, 12).block_ids == [0, 1, 2]
    before = KVCacheInspector(kv).block_map()
    b = make("b", range(8))
    assert kv.allocate_slots(b, 8) is None
    assert not kv.has_request("b") and kv.num_free_blocks == 1
    a.num_computed_tokens = 12
    assert kv.allocate_slots(a, 5) is None  # needs 2 more blocks, 1 is free
    assert kv.block_table("a") == [0, 1, 2]
    assert KVCacheInspector(kv).block_map().equals(before)
    kv.check_invariants()


def test_free_unknown_or_twice_is_a_noop():
    kv = KVCacheManager(4, 4)
    kv.free("nobody")
    a = make("a", range(4))
    kv.allocate_slots(a, 4)
    kv.free(a)
    kv.free(a)
    kv.check_invariants()
    assert kv.num_free_blocks == 4


def test_prefix_hit_shares_three_blocks():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    prefix = list(range(100, 112))  # 3 full blocks
    a = make("a", prefix + [1, 2])
    compute(kv, a, 14)
    assert kv.block_table("a") == [0, 1, 2, 3]
    b = make("b", prefix + [7, 8, 9])
    blocks, n = kv.get_computed_blocks(b)
    assert (blocks.block_ids, n) == ([0, 1, 2], 12)
    assert compute(kv, b, 3, blocks) == [4]
    assert kv.block_table("b") == [0, 1, 2, 4]
    assert [kv.ref_count(i) for i in range(5)] == [2, 2, 2, 1, 1]
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (15, 12)  # a never looked up (no computed_blocks)
    assert kv.hit_rate == pytest.approx(12 / 15)
    kv.free(a)
    assert [kv.ref_count(i) for i in range(5)] == [1, 1, 1, 0, 1]
    kv.check_invariants()


def test_lookup_leaves_at_least_one_token_to_compute():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(12))
    compute(kv, make("a", prompt + [50]), 13)
    assert _lookup(kv, make("b", prompt)) == ([0, 1], 8)  # exactly 3 full blocks -> 2 reused
    assert _lookup(kv, make("c", prompt + [99])) == ([0, 1, 2], 12)
    assert _lookup(kv, make("d", [0, 1, 2])) == ([], 0)
    assert _lookup(kv, make("e", [5] + prompt[1:])) == ([], 0)  # differs in block 0: chain broken


def test_only_computed_full_blocks_are_hashed():
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    a = make("a", range(10))
    kv.allocate_slots(a, 10)
    assert _lookup(kv, make("b", range(10))) == ([], 0)  # allocated, not computed yet
    a.num_computed_tokens = 6
    assert kv.cache_full_blocks(a) == 1
    a.num_computed_tokens = 10
    assert kv.cache_full_blocks(a) == 1
    assert kv.cache_full_blocks(a) == 0
    assert _lookup(kv, make("b", range(10))) == ([0, 1], 8)


def test_prefix_caching_disabled():
    kv = KVCacheManager(8, 4)
    a = make("a", range(10))
    compute(kv, a, 10)
    assert _lookup(kv, make("b", range(10))) == ([], 0)
    kv.free(a)
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 8


def test_freed_cached_block_is_reused_by_a_later_hit():
    kv = KVCacheManager(6, 4, enable_prefix_caching=True)
    a = make("a", range(10))
    compute(kv, a, 10)
    kv.free(a)
    assert (kv.num_cached_blocks, kv.num_free_blocks, kv.num_used_blocks) == (2, 6, 0)
    c = make("c", list(range(8)) + [42])
    blocks, n = kv.get_computed_blocks(c)
    assert (blocks.block_ids, n) == ([0, 1], 8)
    assert compute(kv, c, 1, blocks) == [3]  # plain free blocks first: 3 (never used), not a's tail 2
    assert kv.block_table("c") == [0, 1, 3]
    assert (kv.num_cached_blocks, kv.num_used_blocks, kv.num_evictions) == (0, 3, 0)


def test_allocation_that_needs_revived_cached_blocks_counts_them():
    kv = KVCacheManager(3, 4, enable_prefix_caching=True)
    a = make("a", range(9))
    compute(kv, a, 9)
    kv.free(a)  # blocks 0, 1 cached; 2 free
    c = make("c", list(range(8)) + [1, 2, 3, 4, 5])
    blocks, _ = kv.get_computed_blocks(c)
    assert blocks.block_ids == [0, 1]
    assert kv.allocate_slots(c, 9, blocks) is None  # 2 revived + 3 new > 3 free
    assert kv.num_cached_blocks == 2 and not kv.has_request("c")
    assert kv.allocate_slots(c, 4, blocks).block_ids == [2]
    kv.check_invariants()


def test_lru_eviction_order():
    kv = KVCacheManager(4, 2, enable_prefix_caching=True)
    a, b = make("a", [1, 2, 3, 4, 5]), make("b", [6, 7, 8, 9, 10])
    compute(kv, a, 4)  # blocks 0, 1 (full, hashed)
    compute(kv, b, 4)  # blocks 2, 3
    kv.free(a)
    kv.free(b)  # LRU order (oldest first): 1, 0, 3, 2 -- each request's tail first
    assert list(kv._cached) == [1, 0, 3, 2]
    assert kv.allocate_slots(make("c", [0]), 1).block_ids == [1]
    assert kv.num_evictions == 1
    assert _lookup(kv, a) == ([0], 2)  # a lost its 2nd block only
    assert kv.allocate_slots(make("d", [0] * 5), 5).block_ids == [0, 3, 2]
    assert kv.num_evictions == 4 and kv.num_cached_blocks == 0
    assert _lookup(kv, b) == ([], 0)
    kv.check_invariants()


def test_duplicate_blocks_computed_in_the_same_step():
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    a, b = make("a", range(9)), make("b", range(9))
    kv.allocate_slots(a, 9), kv.allocate_slots(b, 9)  # a: 0 1 2, b: 3 4 5
    a.num_computed_tokens = b.num_computed_tokens = 9
    assert kv.cache_full_blocks(a) == 2
    assert kv.cache_full_blocks(b) == 0  # same hashes: stay registered to a's blocks
    kv.free(b)
    kv.check_invariants()
    assert kv.num_cached_blocks == 0  # b's copies were plain free blocks
    kv.free(a)
    assert _lookup(kv, make("c", range(9))) == ([0, 1], 8)


def test_fork_shares_full_blocks_and_recomputes_the_tail():
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    parent = make("p", range(10))
    compute(kv, parent, 10)  # [0, 1, 2], tail block 2 holds 2 tokens
    parent.output_token_ids.append(77)
    child = make("c", range(10))
    child.output_token_ids.append(88)
    assert kv.fork(parent, child) == [0, 1]
    assert child.num_computed_tokens == 8 and kv.block_table("c") == [0, 1]
    assert [kv.ref_count(i) for i in range(3)] == [2, 2, 1]
    kv.check_invariants()
    assert compute(kv, child, 3) == [3]  # tokens 8, 9 and its own 88
    assert kv.block_table("c") == [0, 1, 3] and kv.block_table("p") == [0, 1, 2]
    kv.free(parent)
    assert [kv.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    kv.free(child)
    kv.check_invariants()
    assert kv.num_used_blocks == 0


def test_fork_errors_and_limits():
    kv = KVCacheManager(8, 4)
    parent = make("p", range(8))
    with pytest.raises(ValueError, match="holds no blocks"):
        kv.fork(parent, make("c", range(8)))
    compute(kv, parent, 8)
    # the child has exactly 8 tokens: it may share only 1 block, so that one token is left to compute
    child = make("c", range(8))
    assert kv.fork(parent, child) == [0] and child.num_computed_tokens == 4
    with pytest.raises(ValueError, match="must be new"):
        kv.fork(parent, child)
    with pytest.raises(ValueError, match="must start with"):
        kv.fork(parent, make("x", [9] * 9))
    assert not kv.has_request("x")
    kv.check_invariants()


def test_stale_computed_blocks_are_refused():
    kv = KVCacheManager(4, 2, enable_prefix_caching=True)
    a = make("a", [1, 2, 3])
    compute(kv, a, 3)
    kv.free(a)
    blocks, _ = kv.get_computed_blocks(make("b", [1, 2, 3]))
    assert blocks.block_ids == [0]
    kv.reset_prefix_cache()
    with pytest.raises(ValueError, match="stale"):
        kv.allocate_slots(make("b", [1, 2, 3]), 1, blocks)
    kv.check_invariants()


def test_hash_is_chained_and_deterministic():
    h0 = hash_block_tokens(None, [1, 2])
    assert h0 == hash_block_tokens(None, [1, 2]) and len(h0) == 32
    assert hash_block_tokens(h0, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(None, [2, 1]) != h0


def test_fuzz_invariants_and_cached_content():
    """500 seeded random operations; block contents are tracked to prove every hit is correct."""
    rng = random.Random(1234)
    bs = 4
    kv = KVCacheManager(24, bs, enable_prefix_caching=True)
    slots: dict[int, int] = {}  # slot -> token written by a "forward pass"
    live: dict[str, Request] = {}
    prefixes = [[rng.randrange(5) for _ in range(12)] for _ in range(3)]
    num_hits = 0

    def write(req, n):
        table = kv.block_table(req.request_id)
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + n):
            slots[table[pos // bs] * bs + pos % bs] = req.all_token_ids[pos]
        req.num_computed_tokens += n
        kv.cache_full_blocks(req)

    for step in range(500):
        op = rng.choice(["add", "add", "step", "step", "free", "free", "fork"])
        if op == "add":
            req = make(f"r{step}", rng.choice(prefixes)[:rng.randrange(1, 13)] + [rng.randrange(5) for _ in range(rng.randrange(0, 9))])
            blocks, n = kv.get_computed_blocks(req)
            for i, b in enumerate(blocks):  # a hit must hold exactly this request's tokens
                assert [slots[b * bs + j] for j in range(bs)] == req.all_token_ids[i * bs:(i + 1) * bs]
            assert n < req.num_tokens
            k = rng.randrange(1, req.num_tokens - n + 1)
            if kv.allocate_slots(req, k, blocks) is not None:
                num_hits += bool(blocks)
                req.num_computed_tokens = n
                write(req, k)
                live[req.request_id] = req
        elif op == "step" and live:
            req = rng.choice(list(live.values()))
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(rng.randrange(5))
            k = rng.randrange(1, req.num_tokens - req.num_computed_tokens + 1)
            if kv.allocate_slots(req, k) is not None:
                write(req, k)
        elif op == "free" and live:
            kv.free(live.pop(rng.choice(sorted(live))))
        elif op == "fork" and live:
            parent = rng.choice(list(live.values()))
            child = make(f"f{step}", parent.all_token_ids + [rng.randrange(5)])
            shared = kv.fork(parent, child)
            assert child.num_computed_tokens == len(shared) * bs
            live[child.request_id] = child
        kv.check_invariants()
        stats = KVCacheInspector(kv).stats()
        assert stats["used"] + stats["free"] + stats["cached"] == 24
    assert num_hits > 10 and kv.num_evictions > 0  # the fuzz exercised sharing and eviction
    for rid in list(live):
        kv.free(rid)
    kv.check_invariants()
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 24


def test_inspector_stats_and_block_map():
    kv = KVCacheManager(6, 4, enable_prefix_caching=True, bytes_per_token=1024)
    a = make("a", range(10))
    compute(kv, a, 10)
    b = make("b", list(range(8)) + [5])
    blocks, _ = kv.get_computed_blocks(b)
    compute(kv, b, 1, blocks)
    c = make("c", [9] * 4)
    compute(kv, c, 4)
    kv.free(c)
    insp = KVCacheInspector(kv)
    s = insp.stats()
    assert {k: s[k] for k in ("num_blocks", "block_size", "used", "free", "cached", "num_requests")} == {
        "num_blocks": 6, "block_size": 4, "used": 4, "free": 1, "cached": 1, "num_requests": 2}
    assert s["usage_pct"] == pytest.approx(400 / 6)
    assert (s["num_queried_tokens"], s["num_cached_tokens"], s["num_evictions"]) == (9, 8, 0)
    assert s["hit_rate"] == pytest.approx(8 / 9) and s["memory_mib"] == pytest.approx(6 * 4 * 1024 / 2**20)
    df = insp.block_map()
    assert list(df.columns) == ["block_id", "owner_request_ids", "ref_count", "hash", "state", "num_tokens"]
    assert df["block_id"].tolist() == list(range(6))
    assert df["owner_request_ids"].tolist() == [("a", "b"), ("a", "b"), ("a",), ("b",), (), ()]
    assert df["ref_count"].tolist() == [2, 2, 1, 1, 0, 0]
    assert df["state"].tolist() == ["used", "used", "used", "used", "cached", "free"]
    assert df["num_tokens"].tolist() == [4, 4, 2, 1, 4, 0]
    hashes = df["hash"].tolist()
    assert all(isinstance(h, str) and len(h) == 8 for h in hashes[:2] + hashes[4:5])
    assert hashes[2] is None and hashes[3] is None and hashes[5] is None
    snap = insp.snapshot()
    assert list(snap.columns) == ["step"] + list(KVCacheInspector.COLUMNS)
    assert set(snap["step"]) == {0} and set(insp.snapshot()["step"]) == {1} and set(insp.snapshot(step=7)["step"]) == {7}
    page = kv._repr_html_()
    assert "usage_pct" in page and page.count("title='block ") == 6 and "owners a, b" in page


def test_from_budget_arithmetic_and_errors():
    bpt, bs = 1024, 16
    assert KVCacheManager.from_budget(bpt, bs, memory_bytes=bpt * bs * 10 + 5).num_blocks == 10
    assert KVCacheManager.from_budget(bpt, bs, max_tokens=100).num_blocks == 7  # rounded up
    assert KVCacheManager.from_budget(bpt, bs, max_tokens=96).num_blocks == 6
    m = KVCacheManager.from_budget(bpt, bs, num_blocks=3, enable_prefix_caching=True)
    assert (m.num_blocks, m.block_size, m.enable_prefix_caching, m.bytes_per_token) == (3, 16, True, 1024)
    with pytest.raises(ValueError, match="exactly one of max_tokens, num_blocks, memory_bytes; got none"):
        KVCacheManager.from_budget(bpt, bs)
    with pytest.raises(ValueError, match="got max_tokens, num_blocks"):
        KVCacheManager.from_budget(bpt, bs, max_tokens=10, num_blocks=2)
    with pytest.raises(ValueError, match="memory_bytes=1000 holds no block"):
        KVCacheManager.from_budget(bpt, bs, memory_bytes=1000)
    with pytest.raises(ValueError, match="bytes_per_token"):
        KVCacheManager.from_budget(0, bs, num_blocks=2)
    with pytest.raises(ValueError, match="max_tokens"):
        KVCacheManager.from_budget(bpt, bs, max_tokens=-5)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(0, 4)


def test_gpu_memory_budget_errors():
    with pytest.raises(ValueError, match="fraction"):
        gpu_memory_budget(1.5)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        gpu_memory_budget(0.9, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            gpu_memory_budget(0.9)


@pytest.mark.gpu
def test_gpu_memory_budget_on_gpu():
    free_bytes, _ = torch.cuda.mem_get_info()
    budget = gpu_memory_budget(0.5)
    assert 0 < budget <= free_bytes
