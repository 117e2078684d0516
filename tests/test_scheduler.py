"""Scheduler: budgets, chunked prefill, both policies, prefix reuse, rejection, finish in any state.

The fake model keeps a paged "KV cache" of token ids: every scheduled token is written to
the slot its block table names, and a sampled token is a hash of the context read *back
from those slots*. A wrong block table, a bad prefix hit or a broken recompute after a
preemption therefore changes the output, which must equal running the request alone.
"""

import dataclasses
import random

import pytest

from kit.kv_cache import KVCacheManager
from kit.request import Request, RequestStatus
from kit.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, SchedulerPolicy

GUARANTEED, MAX_UTIL = SchedulerPolicy.GUARANTEED_NO_EVICT, SchedulerPolicy.MAX_UTILIZATION


def next_token(context):
    h = 0
    for t in context:
        h = (h * 31 + t + 1) % 1_000_003
    return h % 1000


def reference(prompt, max_tokens):
    """The output of a request run alone."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class FakeModel:
    def __init__(self, block_size):
        self.bs = block_size
        self.slots = {}

    def slot(self, seq, pos):
        return seq.block_table[pos // self.bs] * self.bs + pos % self.bs

    def forward(self, out: SchedulerOutput) -> dict:
        for seq in out.scheduled:  # like one layer: all K/V writes, then attention reads
            for i, tok in enumerate(seq.token_ids):
                self.slots[self.slot(seq, seq.num_computed_tokens + i)] = tok
        sampled = {}
        for seq in out.scheduled:
            if seq.is_last_chunk:
                n = seq.num_computed_tokens + len(seq.token_ids)
                sampled[seq.request_id] = next_token([self.slots[self.slot(seq, p)] for p in range(n)])
        return sampled


def make_scheduler(num_blocks=64, block_size=4, caching=False, **cfg):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(**cfg), kv), kv


def run(sched, on_step=None, max_steps=5000, model=None):
    """Drive the scheduler to completion, checking budgets and bookkeeping every step."""
    kv, cfg = sched.kv_cache_manager, sched.config
    model = model or FakeModel(kv.block_size)
    outs = []
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.batch_size <= cfg.max_batch_size
        assert out.num_scheduled_tokens == sum(len(s.token_ids) for s in out.scheduled) <= cfg.max_num_tokens
        assert len({s.request_id for s in out.scheduled}) == out.batch_size
        for s in out.scheduled:
            req = sched.get(s.request_id)
            assert s.token_ids == tuple(req.all_token_ids[s.num_computed_tokens:s.num_computed_tokens + len(s.token_ids)])
            assert len(s.block_table) * kv.block_size >= s.num_computed_tokens + len(s.token_ids)
            assert s.is_last_chunk == (s.num_computed_tokens + len(s.token_ids) == req.num_tokens)
        kv.check_invariants()
        if on_step:
            on_step(out)  # may abort requests between schedule() and update()
        sched.update(out, {k: v for k, v in model.forward(out).items() if sched.get(k) is not None})
        kv.check_invariants()
        outs.append(out)
        assert len(outs) < max_steps, "the scheduler hung"
    assert kv.num_used_blocks == 0 and sched.num_running == sched.num_waiting == 0
    return outs


def workload(n, seed, prompt_len=(3, 30), max_tokens=(1, 12)):
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(50) for _ in range(rng.randint(*prompt_len))],
                    max_tokens=rng.randint(*max_tokens)) for i in range(n)]


def first_step(outs, rid):
    return next(o.step for o in outs if any(s.request_id == rid for s in o.scheduled))


def test_config_validation():
    for kwargs, field in [({"max_batch_size": 0}, "max_batch_size"), ({"max_num_tokens": 0}, "max_num_tokens"),
                          ({"max_batch_size": 8, "max_num_tokens": 4}, "max_num_tokens"),
                          ({"policy": "fastest"}, "policy"), ({"max_seq_len": 1}, "max_seq_len"),
                          ({"max_bypass_steps": -1}, "max_bypass_steps"),
                          ({"enable_chunked_prefill": "yes"}, "enable_chunked_prefill")]:
        with pytest.raises(ValueError, match=f"SchedulerConfig.{field}"):
            SchedulerConfig(**kwargs)
    cfg = SchedulerConfig(policy="max_utilization")
    assert cfg.policy is MAX_UTIL
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_batch_size = 3


@pytest.mark.parametrize("policy", [GUARANTEED, MAX_UTIL])
@pytest.mark.parametrize("chunked", [True, False])
def test_budgets_never_exceeded_and_outputs_match(policy, chunked):
    sched, kv = make_scheduler(40, 4, max_batch_size=4, max_num_tokens=32, enable_chunked_prefill=chunked, policy=policy)
    reqs = workload(20, seed=7)
    for r in reqs:
        sched.add_request(r)
    outs = run(sched)
    assert max(o.batch_size for o in outs) == 4  # the batch was actually full at times
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


def test_chunked_prefill_splits_a_long_prompt_exactly():
    sched, _ = make_scheduler(64, 4, max_batch_size=4, max_num_tokens=16)
    a = Request("a", list(range(50)), max_tokens=3)
    sched.add_request(a)
    outs = run(sched)
    chunks = [o.scheduled[0] for o in outs]
    assert [len(c.token_ids) for c in chunks] == [16, 16, 16, 2, 1, 1]
    assert [c.num_computed_tokens for c in chunks] == [0, 16, 32, 48, 50, 51]
    assert [c.is_last_chunk for c in chunks] == [False, False, False, True, True, True]
    assert sum((c.token_ids for c in chunks[:4]), ()) == tuple(range(50))
    assert [o.num_prefill_tokens for o in outs] == [16, 16, 16, 2, 0, 0]
    assert [o.num_decode_tokens for o in outs] == [0, 0, 0, 0, 1, 1]
    assert a.output_token_ids == reference(range(50), 3)


def test_decodes_first_then_chunked_prefills_then_admissions():
    sched, _ = make_scheduler(64, 4, max_batch_size=4, max_num_tokens=16)
    a, b, c = Request("a", [1] * 4, 5), Request("b", [2] * 40, 2), Request("c", [3] * 3, 2)
    for r in (a, b, c):
        sched.add_request(r)
    model = FakeModel(4)
    plan = []
    for _ in range(4):
        out = sched.schedule()
        plan.append([(s.request_id, len(s.token_ids)) for s in out.scheduled])
        sched.update(out, model.forward(out))
    assert plan == [[("a", 4), ("b", 12)],
                    [("a", 1), ("b", 15)],
                    [("a", 1), ("b", 13), ("c", 2)],  # c gets the 2 tokens left over (chunked)
                    [("a", 1), ("b", 1), ("c", 1)]]


def test_without_chunked_prefill_prompts_are_scheduled_whole():
    sched, _ = make_scheduler(64, 4, max_batch_size=4, max_num_tokens=16, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="enable_chunked_prefill=False"):
        sched.add_request(Request("long", [0] * 17, max_tokens=1))
    a, b, c = Request("a", [1] * 10, 3), Request("b", [2] * 12, 3), Request("c", [3] * 3, 3)
    for r in (a, b, c):
        sched.add_request(r)
    outs = run(sched)
    assert [[(s.request_id, len(s.token_ids)) for s in o.scheduled] for o in outs[:2]] == [
        [("a", 10)],  # b does not fit the 6 tokens left, and c may not pass it (FCFS)
        [("a", 1), ("b", 12), ("c", 3)]]
    for o in outs:
        for s in o.scheduled:
            assert len(s.token_ids) == 1 or (s.num_computed_tokens == 0 and s.is_last_chunk)
    assert c.output_token_ids == reference(c.prompt_token_ids, 3)


def test_max_utilization_preempts_and_recomputes_identically():
    sched, kv = make_scheduler(10, 4, max_batch_size=4, max_num_tokens=32, policy=MAX_UTIL)
    reqs = workload(8, seed=3, prompt_len=(6, 14), max_tokens=(8, 14))
    for r in reqs:
        sched.add_request(r)
    seen_front = []

    def check_preemption(out):
        if out.preempted_request_ids:
            head = sched.waiting[0]
            assert head.request_id in out.preempted_request_ids
            assert head.status is RequestStatus.PREEMPTED and head.num_computed_tokens == 0
            assert not kv.has_request(head.request_id)
            seen_front.append(head.request_id)

    outs = run(sched, on_step=check_preemption)
    preempted = [rid for o in outs for rid in o.preempted_request_ids]
    assert len(preempted) >= 3 and seen_front
    assert sum(r.num_preemptions for r in reqs) == len(preempted) == sched.num_preemptions
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


def test_max_utilization_preempts_the_most_recently_admitted():
    sched, kv = make_scheduler(4, 2, max_batch_size=4, max_num_tokens=16, policy=MAX_UTIL)
    a, b = Request("a", [1] * 4, 3), Request("b", [2] * 4, 3)
    sched.add_request(a), sched.add_request(b)
    model = FakeModel(2)
    out = sched.schedule()  # a: blocks 0 1, b: blocks 2 3 -- the pool is full
    sched.update(out, model.forward(out))
    out = sched.schedule()  # a's next token needs a 5th slot: b (admitted last) is preempted
    assert out.preempted_request_ids == ("b",) and [s.request_id for s in out.scheduled] == ["a"]
    assert out.scheduled[0].block_table == (0, 1, 3)  # b's tail block is reused first
    assert (b.status, b.num_computed_tokens, b.num_preemptions, b.output_token_ids) == (
        RequestStatus.PREEMPTED, 0, 1, reference([2] * 4, 1))
    assert list(sched.waiting) == [b] and out.num_waiting == 1
    sched.update(out, model.forward(out))
    run(sched, model=model)
    assert b.output_token_ids == reference([2] * 4, 3) and a.output_token_ids == reference([1] * 4, 3)


def test_guaranteed_no_evict_never_preempts():
    sched, kv = make_scheduler(10, 4, max_batch_size=4, max_num_tokens=32, policy=GUARANTEED)
    reqs = workload(8, seed=3, prompt_len=(6, 14), max_tokens=(8, 14))
    for r in reqs:
        sched.add_request(r)

    def check_reservation(out):
        assert sum(kv.num_blocks_for(r.num_prompt_tokens + r.max_tokens - 1) for r in sched.running) <= kv.num_blocks

    outs = run(sched, on_step=check_reservation)
    assert all(not o.preempted_request_ids for o in outs) and sched.num_preemptions == 0
    for r in reqs:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


@pytest.mark.parametrize("policy, b_starts", [(GUARANTEED, 8), (MAX_UTIL, 1)])
def test_guaranteed_reserves_the_whole_budget(policy, b_starts):
    # each request: 6 + 7 - 1 = 12 cache tokens = 3 blocks for its budget; the pool has 5
    sched, _ = make_scheduler(5, 4, max_batch_size=4, max_num_tokens=32, policy=policy)
    a, b = Request("a", [1] * 6, 7), Request("b", [2] * 6, 7)
    sched.add_request(a), sched.add_request(b)
    outs = run(sched)
    assert first_step(outs, "a") == 1 and first_step(outs, "b") == b_starts  # a finishes at step 7
    assert a.output_token_ids == reference([1] * 6, 7) and b.output_token_ids == reference([2] * 6, 7)


@pytest.mark.parametrize("bypass, x_before_h", [(0, False), (16, True)])
def test_max_utilization_bypass_is_bounded(bypass, x_before_h):
    sched, _ = make_scheduler(6, 4, max_batch_size=4, max_num_tokens=32, enable_chunked_prefill=False,
                              policy=MAX_UTIL, max_bypass_steps=bypass)
    sched.add_request(Request("s", [1] * 4, 8))
    model = FakeModel(4)
    out = sched.schedule()
    sched.update(out, model.forward(out))
    sched.add_request(Request("h", [2] * 20, 2))  # 5 blocks for its prompt; only 4 are free
    for i in range(3):
        sched.add_request(Request(f"x{i}", [3 + i] * 3, 2))
    outs = [out] + run(sched, model=model)
    assert (first_step(outs, "x0") < first_step(outs, "h")) == x_before_h


@pytest.mark.parametrize("policy", [GUARANTEED, MAX_UTIL])
def test_prefix_caching_reduces_prefill_tokens(policy):
    system = list(range(100, 112))  # 3 full blocks of 4

    def serve(caching):
        sched, kv = make_scheduler(32, 4, caching=caching, max_batch_size=4, max_num_tokens=32, policy=policy)
        reqs = [Request(f"r{i}", system + [i, i + 1, i + 2], max_tokens=4) for i in range(4)]
        sched.add_request(reqs[0])
        outs = run(sched, on_step=lambda out: out.step == 1 and [sched.add_request(r) for r in reqs[1:]])
        for r in reqs:
            assert r.output_token_ids == reference(r.prompt_token_ids, 4)
        return sum(o.num_prefill_tokens for o in outs), reqs, kv

    cold, _, _ = serve(False)
    warm, reqs, kv = serve(True)
    assert cold == 4 * 15 and warm == 15 + 3 * 3
    assert [r.num_cached_tokens for r in reqs] == [0, 12, 12, 12]
    assert kv.num_hit_tokens == 36 and kv.num_queried_tokens == 4 * 15


@pytest.mark.parametrize("policy", [GUARANTEED, MAX_UTIL])
def test_too_large_request_is_rejected_not_hung(policy):
    sched, _ = make_scheduler(4, 4, max_batch_size=4, max_num_tokens=32, policy=policy)
    big, small = Request("big", [1] * 10, 10), Request("small", [2] * 3, 3)  # big: 19 tokens = 5 blocks > 4
    sched.add_request(big), sched.add_request(small)
    assert sched.has_unfinished() and sched.get("big") is None
    outs = run(sched)
    assert outs[0].rejected == (("big", "needs 5 KV blocks for prompt+max_tokens (20 tokens) but the cache has "
                                        "4 blocks of 4 tokens"),)
    assert big.status is RequestStatus.FINISHED_ERROR and big.status.finish_reason == "error"
    assert all(not o.rejected for o in outs[1:]) and small.output_token_ids == reference([2] * 3, 3)


def test_max_seq_len_caps_the_budget_and_ends_with_length():
    sched, _ = make_scheduler(4, 4, max_batch_size=4, max_num_tokens=32, max_seq_len=16)
    big = Request("big", [1] * 10, 10)  # capped to 16 tokens: 15 in the cache = 4 blocks
    sched.add_request(big)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        sched.add_request(Request("long", [1] * 16, 1))
    run(sched)
    assert big.status is RequestStatus.FINISHED_LENGTH and big.num_tokens == 16
    assert big.output_token_ids == reference([1] * 10, 6)


def test_update_returns_finished_ids_and_stop_wins_over_length():
    sched, kv = make_scheduler(16, 4, max_batch_size=4, max_num_tokens=32)
    a, b, c = Request("a", [1, 2], 1), Request("b", [3, 4], 1), Request("c", [5, 6], 5)
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    done = sched.update(out, {"a": 7, "b": 8, "c": 9}, finished={"b": RequestStatus.FINISHED_STOPPED})
    assert done == ("a", "b")
    assert (a.status, b.status, c.status) == (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED,
                                              RequestStatus.RUNNING)
    assert kv.block_table("a") == kv.block_table("b") == [] and sched.num_running == 1
    assert sched.finish("c", RequestStatus.FINISHED_ABORTED) and not sched.finish("c", RequestStatus.FINISHED_ABORTED)
    assert kv.num_used_blocks == 0 and not sched.has_unfinished()
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish("a", RequestStatus.RUNNING)


def test_update_validates_before_changing_anything():
    sched, _ = make_scheduler(16, 4, max_batch_size=4, max_num_tokens=8)
    a, b = Request("a", [1] * 4, 3), Request("b", [2] * 10, 3)
    sched.add_request(a), sched.add_request(b)
    out = sched.schedule()  # a: 4 (last chunk), b: 4 of 10
    with pytest.raises(ValueError, match="no sampled token for 'a'"):
        sched.update(out, {})
    with pytest.raises(ValueError, match="mid-prefill"):
        sched.update(out, {"a": 1, "b": 2})
    assert a.num_computed_tokens == b.num_computed_tokens == 0 and a.output_token_ids == []
    sched.update(out, {"a": 1, "b": None})
    assert (a.num_computed_tokens, b.num_computed_tokens, a.output_token_ids) == (4, 4, [1])
    with pytest.raises(RuntimeError, match="stale"):
        sched.update(out, {"a": 1})
    with pytest.raises(ValueError, match="already in the scheduler"):
        sched.add_request(Request("a", [1], 1))


def test_finish_in_every_state_frees_all_blocks():
    sched, kv = make_scheduler(16, 4, max_batch_size=2, max_num_tokens=8)
    dec, pre, wait, inflight = (Request("dec", [1] * 3, 9), Request("pre", [2] * 20, 9),
                                Request("wait", [3] * 3, 9), Request("inflight", [4] * 3, 9))
    for r in (dec, pre, wait):
        sched.add_request(r)
    model = FakeModel(4)
    for _ in range(2):
        out = sched.schedule()
        sched.update(out, model.forward(out))
    assert not dec.is_prefill and pre.is_prefill and pre.num_computed_tokens == 12 and wait.status is RequestStatus.WAITING
    for r, status in ((wait, RequestStatus.FINISHED_ABORTED), (pre, RequestStatus.FINISHED_ERROR),
                      (dec, RequestStatus.FINISHED_ABORTED)):
        assert sched.finish(r.request_id, status) and r.status is status
        kv.check_invariants()
    assert kv.num_used_blocks == 0 and not sched.has_unfinished()
    sched.add_request(inflight)
    out = sched.schedule()
    sched.finish("inflight", RequestStatus.FINISHED_ABORTED)  # between schedule() and update()
    assert sched.update(out, {"inflight": 5}) == () and inflight.output_token_ids == []
    assert kv.num_used_blocks == 0 and not sched.finish("nobody", RequestStatus.FINISHED_ABORTED)


@pytest.mark.parametrize("seed", range(4))
def test_random_arrivals_and_aborts_never_corrupt(seed):
    rng = random.Random(seed)
    policy, chunked, caching = rng.choice([GUARANTEED, MAX_UTIL]), seed % 2 == 0, seed < 2
    sched, kv = make_scheduler(12, 4, caching=caching, max_batch_size=3, max_num_tokens=16,
                               enable_chunked_prefill=chunked, policy=policy)
    shared = [rng.randrange(50) for _ in range(8)]
    pending = [Request(f"r{i}", shared[:rng.randint(0, 8)] + [rng.randrange(50) for _ in range(rng.randint(1, 8))],
                       max_tokens=rng.randint(1, 20)) for i in range(30)]
    reqs = list(pending)
    aborted = set()

    def chaos(out):
        for _ in range(rng.randint(0, 2)):
            if pending:
                sched.add_request(pending.pop(0))
        if rng.random() < 0.15:
            live = [r for r in reqs if r.request_id not in aborted and sched.get(r.request_id)]
            if live:
                victim = rng.choice(live)
                sched.finish(victim.request_id, RequestStatus.FINISHED_ABORTED)
                aborted.add(victim.request_id)
                kv.check_invariants()

    sched.add_request(pending.pop(0))
    model = FakeModel(4)  # one "KV cache" for the whole run: cached blocks outlive a drained queue
    while sched.has_unfinished() or pending:
        run(sched, on_step=chaos, model=model)
        if pending:
            sched.add_request(pending.pop(0))
    assert len(aborted) >= 2
    for r in reqs:
        expected = reference(r.prompt_token_ids, r.max_tokens)
        if r.request_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED and r.output_token_ids == expected[:r.num_output_tokens]
        else:
            assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == expected


def test_fork_shares_the_prompt_for_n_completions():
    sched, kv = make_scheduler(16, 4, caching=True, max_batch_size=4, max_num_tokens=32)
    prompt = list(range(10))
    parent = Request("p", prompt, max_tokens=4)
    sched.add_request(parent)
    model = FakeModel(4)
    out = sched.schedule()
    sched.update(out, model.forward(out))
    first = parent.output_token_ids[0]
    children = [Request(f"p-{i}", prompt, max_tokens=4, output_token_ids=[first]) for i in (1, 2)]
    assert [sched.fork("p", c) for c in children] == [8, 8]
    assert [r.request_id for r in sched.waiting] == ["p-1", "p-2"]
    assert [kv.ref_count(b) for b in kv.block_table("p")] == [3, 3, 1]
    out = sched.schedule()
    assert [(s.request_id, s.num_computed_tokens, s.token_ids) for s in out.scheduled] == [
        ("p", 10, (first,)), ("p-1", 8, (8, 9, first)), ("p-2", 8, (8, 9, first))]
    sched.update(out, model.forward(out))
    run(sched, model=model)
    for r in [parent] + children:
        assert r.output_token_ids == reference(prompt, 4) and r.num_cached_tokens == (8 if r is not parent else 0)
    with pytest.raises(ValueError, match="unknown or finished parent"):
        sched.fork("p", Request("p-3", prompt, 4))


def test_request_properties():
    r = Request("r", [1, 2, 3], max_tokens=4)
    assert (r.num_tokens, r.num_prompt_tokens, r.num_output_tokens, r.is_prefill) == (3, 3, 0, True)
    r.num_computed_tokens = 3
    r.output_token_ids.append(9)
    assert r.all_token_ids == [1, 2, 3, 9] and not r.is_prefill and r.num_tokens_to_compute == 1
    r.num_computed_tokens = 0  # preempted: prompt + output are recomputed
    assert r.is_prefill and not r.is_finished
    assert Request("one", [5], 1).is_prefill  # a 1-token prompt is a prefill too
    assert RequestStatus.FINISHED_LENGTH.is_finished and RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.PREEMPTED.finish_reason is None


def test_token_ids_between_is_the_slice_of_all_token_ids():
    r = Request("r", [1, 2, 3], max_tokens=4, output_token_ids=[7, 8])
    for start in range(6):
        for stop in range(start, 7):
            assert r.token_ids_between(start, stop) == r.all_token_ids[start:stop], (start, stop)


def test_waiting_forked_children_never_deadlock():
    # two parents fill the pool; their children (6 blocks each, 3 shared) cannot both wait on blocks
    # the other holds: with nothing running, the last child's blocks are released and it is recomputed
    sched, kv = make_scheduler(8, 4, caching=True, max_batch_size=4, max_num_tokens=32)
    parents = [Request(p, [i] * 12, max_tokens=2) for i, p in enumerate("AB")]
    for p in parents:
        sched.add_request(p)
    model = FakeModel(4)
    out = sched.schedule()
    sched.update(out, model.forward(out))
    children = [Request(p.request_id + "1", p.prompt_token_ids, 10, output_token_ids=p.output_token_ids)
                for p in parents]
    assert [sched.fork(p.request_id, c) for p, c in zip(parents, children)] == [12, 12]
    outs = run(sched, model=model)
    assert [o.batch_size for o in outs[:3]] == [2, 0, 1]  # step 3 released B1's blocks; A1 runs at step 4
    for r in parents + children:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)
    assert not any(o.preempted_request_ids or o.rejected for o in outs)


def test_docstring_example_of_a_step_plan():
    sched, _ = make_scheduler(64, 4, max_batch_size=4, max_num_tokens=16)
    for rid, n in (("A", 20), ("B", 6), ("C", 11)):
        sched.add_request(Request(rid, [len(rid)] * n, 5))
    model, plan = FakeModel(4), []
    for _ in range(3):
        out = sched.schedule()
        plan.append([(s.request_id, s.num_computed_tokens, len(s.token_ids)) for s in out.scheduled])
        sched.update(out, model.forward(out))
    assert plan == [[("A", 0, 16)], [("A", 16, 4), ("B", 0, 6), ("C", 0, 6)], [("A", 20, 1), ("B", 6, 1), ("C", 6, 5)]]


def test_decode_blocks_are_hashed_when_they_fill_and_a_later_request_reuses_them():
    # block_size 4, prompt 6: the prompt's first block is hashed at prefill, the second when decode fills it
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_num_tokens=16), kv)
    s.add_request(Request("a", [5, 6, 7, 8, 9, 10], max_tokens=6))
    hashed = []
    out = s.schedule()
    s.update(out, {"a": 11})
    hashed.append(len(kv._hashes["a"]))
    for token in (12, 13, 14):  # overlapped: advance with a placeholder, then commit the token
        out = s.schedule()
        placeholders = s.advance(out)
        s.commit(placeholders, {"a": token})
        hashed.append(len(kv._hashes["a"]))
    # computed tokens 6, 7, 8, 9: one full block, then the second fills at 8
    assert hashed == [1, 1, 2, 2]
    s.finish("a", RequestStatus.FINISHED_ABORTED)
    s.add_request(Request("b", [5, 6, 7, 8, 9, 10, 11, 12, 1], max_tokens=2))
    out = s.schedule()
    assert out.scheduled[0].num_computed_tokens == 8  # both blocks of "a" are hits
