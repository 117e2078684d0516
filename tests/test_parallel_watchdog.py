"""Hangs in tensor parallelism become errors naming the rank and the step (CPU, gloo, spawned ranks).

* every rank issues the same collectives, in the same order, for each engine call the GPU
  benchmark makes (bench/tp.py's path: alloc, decode, eager hooks, the profiler's timed
  collectives, a prefill with logits of every position, a second cache, the executor), and a
  step refused on rank 0 (a batch for another block size) sends nothing;
* a rank that ran other collectives than rank 0 is caught at the next step message;
* an engine left idle longer than the process group's timeout still runs (keepalive);
* a stalled rank 0 is named by the waiting rank's watchdog, and the next call fails with it;
* `StageWatchdog` reports a stage that outlives its timeout, once, with the stacks.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from pathlib import Path

import pytest
import torch

from helpers import engine_for, make_hf_checkpoint
from kit import LLM, SamplingParams
from kit.backends.base import LayerHook
from kit.batch import ForwardBatch, SequenceInput
from kit.builder import BuildConfig
from kit.parallel import DistributedEngine
from kit.parallel.comm import TRACE_ENV
from kit.parallel.watchdog import StageWatchdog
from kit.profiler import ProfiledEngine

BC = BuildConfig(max_batch_size=4, max_seq_len=128, max_input_len=64, max_num_tokens=64)
COLLECTIVE = re.compile(r"#(\d+) (\S+) (\S*) ?(.*)$")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpw") / "llama"
    make_hf_checkpoint("llama", path)
    return str(path)


def _decode(n: int, ctx: int, device="cpu") -> ForwardBatch:
    return ForwardBatch.build([SequenceInput([7 + i], ctx, [2 * i, 2 * i + 1]) for i in range(n)], 16, device=device)


def _collectives(log: Path) -> list[tuple[str, str, str]]:
    out = []
    for line in log.read_text().splitlines():
        m = COLLECTIVE.search(line)
        if m:
            out.append((m.group(2), m.group(3), m.group(4)))
    return out


def _messages(log: Path, verb: str) -> list[str]:
    return [line.split(f"{verb} ", 1)[1] for line in log.read_text().splitlines() if f"  {verb} step" in line]


def _no_children_left(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("step_channel", ["shared-memory", "broadcast"])
def test_every_rank_issues_the_same_collectives_for_each_engine_call(llama, tmp_path, monkeypatch, step_channel):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    engine = DistributedEngine.start(engine_for(llama).network, 2, build_config=BC, timeout_s=60,
                                     step_channel=step_channel)
    try:
        assert engine.step_channel == step_channel.replace("-", " ")
        kv = engine.allocate_kv_cache(8, 16)
        engine.forward(ForwardBatch.build([SequenceInput([5, 6, 7, 8], 0, [0, 1]),
                                           SequenceInput([9, 10], 0, [2, 3])], 16), kv)
        for k in range(3):  # decode at batch 1 and batch 2, then eagerly with hooks (as the bench measures)
            engine.forward(_decode(1, 4 + k), kv)
            engine.forward(_decode(2, 4 + k), kv, hooks=[LayerHook()])
        with pytest.raises(ValueError, match="batch was built for block_size 32, cache has 16"):
            engine.forward(ForwardBatch.build([SequenceInput([5], 3, [0])], 32), kv)  # refused before any message
        ProfiledEngine(engine, 16).collectives(batch_size=1, seq_len=8, phase="decode", iters=2)
        second = engine.allocate_kv_cache(2, 16)  # the bench's top-1: a cache of its own, logits of every position
        logits = engine.forward(ForwardBatch.build([SequenceInput(list(range(3, 20)), 0, [0, 1], logits="all")],
                                                   16), second)
        assert logits.shape == (17, 211)
        del second
        llm = LLM(engine)
        out = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
        count = engine.backend.comm.count
    finally:
        engine.shutdown()
    r0, r1 = tmp_path / "trace" / "rank0.log", tmp_path / "trace" / "rank1.log"
    c0, c1 = _collectives(r0), _collectives(r1)
    # + the barrier of the ranks leaving the group together, and on the broadcast path the SHUTDOWN message
    # (through shared memory only a step's payload is a collective)
    assert len(c0) == count + (2 if step_channel == "broadcast" else 1)
    assert c0[-1] == ("barrier", "", "")
    assert c0 == c1  # the same op, layer, shape and dtype, in the same order, on both ranks
    assert ("all_reduce", "layers.1.mlp", "(2, 64) float32") in c0 and ("gather", "lm_head", "(17, 106) float32") in c0
    sent, received = _messages(r0, "send"), _messages(r1, "received")
    assert sent == received and sent[-1].endswith("SHUTDOWN") and sent[0].startswith("step 1 ALLOC")
    assert any("FORWARD (prefill, 17 tokens, 1 seqs" in m for m in sent)
    _no_children_left(engine.pids)


def test_a_rank_that_ran_other_collectives_is_named_at_the_next_step(llama):
    engine = DistributedEngine.start(engine_for(llama).network, 2, build_config=BC, timeout_s=60)
    try:
        kv = engine.allocate_kv_cache(4, 16)
        engine.forward(_decode(1, 3), kv)
        n = engine.backend.comm.count
        engine.backend.comm.count += 1  # as if rank 0 had run one collective the other rank did not
        with pytest.raises(RuntimeError, match=rf"rank 1 \(pid \d+\) died .*CollectiveMismatch: rank 1: step 3 "
                                               rf"FORWARD \(decode, 1 tokens, 1 seqs.*after {n + 1} collectives; this "
                                               rf"rank expected message 3 and had issued {n}:"):
            engine.forward(_decode(1, 4), kv)
        with pytest.raises(RuntimeError, match="rank 1"):  # and the engine refuses further steps
            engine.forward(_decode(1, 4), kv)
    finally:
        engine.shutdown()
    _no_children_left(engine.pids)


def test_an_idle_engine_outlives_the_process_group_timeout(llama):
    engine = DistributedEngine.start(engine_for(llama).network, 2, build_config=BC, timeout_s=2)
    try:
        kv = engine.allocate_kv_cache(4, 16)
        first = engine.forward(_decode(1, 3), kv)
        time.sleep(15)  # past the group's timeout (1.5 x 2 + 10 s): only the keepalive messages went out
        assert engine.is_alive
        assert torch.equal(engine.forward(_decode(1, 3), kv), first)
        assert engine.ranks.channel.seq > 3 + 10  # NOOPs every 0.5 s
    finally:
        engine.shutdown()
    _no_children_left(engine.pids)


def test_a_stalled_rank_0_is_named_by_the_waiting_rank(llama, capfd):
    engine = DistributedEngine.start(engine_for(llama).network, 2, build_config=BC, timeout_s=2)
    try:
        kv = engine.allocate_kv_cache(4, 16)
        engine.forward(_decode(1, 3), kv)
        with engine.ranks.lock:  # rank 0 stuck between steps: no message, not even a keepalive
            deadline = time.monotonic() + 20
            while engine.ranks.dead_rank() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) died with exit code 3: rank 1: 'wait for step 3 "
                                               r"\(the last was step 2 FORWARD \(decode.*has not finished after"):
            engine.forward(_decode(1, 4), kv)
    finally:
        engine.shutdown()
    err = capfd.readouterr().err
    assert "rank 1: 'wait for step 3" in err and "stacks of every thread follow" in err
    assert "in receive" in err  # the stack shows where the rank waited
    _no_children_left(engine.pids)


def test_stage_watchdog_reports_a_stage_past_its_timeout_once(capfd):
    seen: list[str] = []
    dog = StageWatchdog(3, 0.3, seen.append, poll_s=0.05)
    try:
        with dog.stage("quick"):
            pass
        with dog.stage("step 9 FORWARD (decode)"):
            time.sleep(1.0)
        time.sleep(0.3)
    finally:
        dog.stop()
    assert len(seen) == 1 and seen == dog.fired
    assert re.fullmatch(r"rank 3: 'step 9 FORWARD \(decode\)' has not finished after 0\.\d s \(last finished: "
                        r"'quick'\)", seen[0])
    err = capfd.readouterr().err
    assert "stacks of every thread follow" in err and "test_stage_watchdog_reports" in err
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        StageWatchdog(0, 0)
