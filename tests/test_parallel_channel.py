"""How step messages reach the other ranks: the shared-memory header ring and its fallback.

* `HeaderRing` (kit/parallel/host_channel.py): messages arrive in order across many wraps of
  the ring; rank 0 never overwrites a slot that a rank has not read (it waits, then gives
  up); a wait ends with `PeerGone` when the process on the other side has exited; a rank on
  another host does not attach, and then no rank uses the ring;
* `StepChannel` over the ring (kit/parallel/protocol.py), with an in-process stand-in for
  the collectives: the payload travels in one broadcast of exactly its length (none for a
  message without one), larger than the capacity too; a skipped message and a rank that ran
  other collectives raise `CollectiveMismatch`;
* end to end (gloo, 2 spawned ranks): TP=2 greedy tokens equal TP=1's over both paths; the
  segment's name is gone from /dev/shm once the engine runs; a killed rank 0 takes rank 1
  with it and leaves no segment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import engine_for, make_hf_checkpoint
from kit import LLM, SamplingParams
from kit.batch import ForwardBatch, SequenceInput
from kit.builder import BuildConfig
from kit.parallel.host_channel import (CHANNEL_ENV, HeaderRing, PeerGone, agree_rank0, channel_mode,
                                       process_start_time)
from kit.parallel.protocol import (FORWARD, HEADER, NOOP, CollectiveMismatch, StepChannel, pack_batch,
                                   unpack_batch)

BC = BuildConfig(max_batch_size=4, max_seq_len=128, max_input_len=64, max_num_tokens=64)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # > 2 x the ring's 8 slots


def _pair(slots: int = 4, timeout_s: float | None = 5.0) -> tuple[HeaderRing, HeaderRing]:
    writer = HeaderRing.create(2, HEADER, slots=slots, spin_s=1e-4, timeout_s=timeout_s)
    reader, why = HeaderRing.attach(writer.spec(), 1, spin_s=1e-4)
    assert why == "attached"
    return writer, reader


def _gone(name: str) -> bool:
    return not os.path.exists(f"/dev/shm/{name}")


def test_ring_delivers_every_message_in_order_across_many_wraps():
    writer, reader = _pair(slots=4)
    n = 50  # 12 times around the ring; the writer runs ahead until the ring is full, then waits
    msgs = [[i] + [7 * i + k for k in range(HEADER - 1)] for i in range(1, n + 1)]
    t = threading.Thread(target=lambda: [writer.write(m) for m in msgs])
    t.start()
    got = [reader.read() for _ in range(n)]
    t.join(10)
    assert got == msgs and writer.done == reader.done == n
    assert int(writer.words[16]) == n  # rank 1's read counter (row 1 + rank)
    writer.close()
    reader.close()
    assert _gone(writer.name)


def test_ring_never_overwrites_an_unread_slot():
    writer, reader = _pair(slots=3, timeout_s=0.3)
    for i in range(1, 4):
        writer.write([i] * HEADER)
    with pytest.raises(TimeoutError, match="rank 0 waits for message 1 to be read before it writes message 4"):
        writer.write([4] * HEADER)
    writer.timeout_s, writer.stop_when = 30.0, lambda: "rank 0's watchdog: 'step 4 FORWARD' has not finished"
    with pytest.raises(RuntimeError, match=r"before it writes message 4: given up \(rank 0's watchdog: 'step 4"):
        writer.write([4] * HEADER)  # long before the 30 s
    writer.stop_when = None
    assert reader.read() == [1] * HEADER  # intact
    writer.write([4] * HEADER)  # now slot 0 is free
    assert [reader.read()[0] for _ in range(3)] == [2, 3, 4]
    with pytest.raises(ValueError, match="a message has 20 words, got 3"):
        writer.write([1, 2, 3])
    writer.close()
    reader.close()


def test_a_wait_ends_when_the_other_process_has_exited():
    writer = HeaderRing.create(2, HEADER, slots=2, spin_s=1e-4, timeout_s=30.0)
    other = subprocess.Popen(["sleep", "30"])
    start = process_start_time(other.pid)
    assert start is not None
    reader, _ = HeaderRing.attach({**writer.spec(), "pid": other.pid, "start_time": start}, 1, spin_s=1e-4)
    writer.peers = {1: (other.pid, start)}
    other.kill()
    other.wait()
    assert process_start_time(other.pid) is None
    t0 = time.monotonic()
    with pytest.raises(PeerGone, match=rf"rank 0 \(pid {other.pid}\) has exited: rank 1 waits for message 1"):
        reader.read()
    writer.write([1] * HEADER)
    writer.write([2] * HEADER)
    with pytest.raises(PeerGone, match=rf"rank 1 \(pid {other.pid}\) has exited: rank 0 waits for message 1"):
        writer.write([3] * HEADER)
    assert time.monotonic() - t0 < 5  # noticed within a few naps, long before the 30 s timeout
    writer.close()
    reader.close()


class _Wire:
    """In-process collectives for two ranks: rank 0's broadcasts are queued, rank r's take them in order."""

    def __init__(self) -> None:
        self.queue: list[torch.Tensor] = []

    def comm(self, rank: int):
        wire = self

        class Comm:
            device, tracing = torch.device("cpu"), False

            def __init__(self) -> None:
                self.rank, self.count, self.sizes = rank, 0, []

            def broadcast(self, t: torch.Tensor, what: str = "step message") -> torch.Tensor:
                self.count += 1
                self.sizes.append(t.numel())
                if self.rank == 0:
                    wire.queue.append(t.clone())
                else:
                    t.copy_(wire.queue.pop(0))
                return t
        return Comm()


def _channels(capacity: int = 200) -> tuple[StepChannel, StepChannel]:
    writer, reader = _pair(slots=2)
    wire = _Wire()
    return StepChannel(wire.comm(0), capacity, writer), StepChannel(wire.comm(1), capacity, reader)


def test_step_channel_sends_the_payload_in_one_broadcast_of_its_exact_length():
    send, recv = _channels(capacity=200)
    assert send.path == recv.path == "shared memory"
    b = ForwardBatch.build([SequenceInput([5, 6, 7], 0, [0, 2]), SequenceInput([9], 20, [1, 3], logits="all")], 16)
    head, payload = pack_batch(b)
    for _ in range(3):  # more messages than the ring's 2 slots
        send.send([FORWARD, 1] + head, payload)
        header, got = recv.receive()
        back = unpack_batch(header, got)
        assert torch.equal(back.block_tables, b.block_tables) and torch.equal(back.input_ids, b.input_ids)
        send.send([NOOP])  # no payload: no collective
        assert recv.receive()[0][0] == NOOP
    assert send.comm.sizes == recv.comm.sizes == [payload.numel()] * 3 and send.comm.count == recv.comm.count == 3
    big = torch.arange(500)  # over the capacity: a tensor of its own
    send.send([FORWARD, 1], big)
    header, got = recv.receive()
    assert header[12] == 500 and torch.equal(got, big) and recv.comm.sizes[-1] == 500
    send.close()
    recv.close()
    assert send.ring.closed and _gone(send.ring.name)
    with pytest.raises(RuntimeError, match=r"HeaderRing\(/dev/shm/kit-tp-.* writer, 7 messages\) is closed"):
        send.send([NOOP])


def test_a_skipped_message_or_other_collectives_raise_collective_mismatch():
    send, recv = _channels()
    send.send([NOOP])
    recv.receive()
    send.seq += 1  # message 2 never reaches rank 1
    send.send([NOOP])
    with pytest.raises(CollectiveMismatch, match=r"rank 1: step 3 NOOP: rank 0 sent message 3 after 0 collectives; "
                                                 r"this rank expected message 2 and had issued 0"):
        recv.receive()
    send, recv = _channels()
    send.comm.count += 1  # rank 0 ran a collective that rank 1 did not
    send.send([NOOP])
    with pytest.raises(CollectiveMismatch, match=r"sent message 1 after 1 collectives; this rank expected message 1 "
                                                 r"and had issued 0"):
        recv.receive()


def test_the_ring_is_used_only_when_every_rank_attached():
    class Comm:
        def __init__(self, attached: bool) -> None:
            self.attached, self.verdict = attached, None

        def gather_object(self, me):
            return [me, {"rank": 1, "attached": self.attached, "why": "rank 1 is on host 'b', rank 0 on 'a'",
                         "pid": 1, "start_time": 1}]

        def broadcast_object(self, obj=None):
            self.verdict = obj
            return obj

    ring = HeaderRing.create(2, HEADER)
    assert HeaderRing.attach({**ring.spec(), "host": "elsewhere"}, 1)[0] is None
    comm = Comm(False)
    assert agree_rank0(comm, ring, "auto") == (None, "rank 1 is on host 'b', rank 0 on 'a'")
    assert comm.verdict == {"use": False, "why": "rank 1 is on host 'b', rank 0 on 'a'"} and _gone(ring.name)
    ring = HeaderRing.create(2, HEADER)
    with pytest.raises(RuntimeError, match="KIT_TP_CHANNEL=shared-memory, but rank 1 is on host 'b'"):
        agree_rank0(Comm(False), ring, "shared-memory")
    assert _gone(ring.name)
    ring = HeaderRing.create(2, HEADER)
    got, _ = agree_rank0(Comm(True), ring, "auto")
    assert got is ring and ring.peers == {1: (1, 1)} and _gone(ring.name)  # unlinked, still mapped
    ring.close()
    with pytest.raises(ValueError, match=r"step channel 'shm' \(KIT_TP_CHANNEL or step_channel=\): must be one of"):
        channel_mode("shm")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpc") / "llama"
    make_hf_checkpoint("llama", path)
    return str(path)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("mode", ["shared-memory", "broadcast"])
def test_tp2_greedy_equals_tp1_over_both_step_channels(llama, monkeypatch, mode):
    with LLM(llama, build_config=BC, enable_build_cache=False) as one:
        want = _tokens(one)
    monkeypatch.setenv(CHANNEL_ENV, mode)
    with LLM(llama, build_config=BC, tensor_parallel_size=2, enable_build_cache=False) as two:
        channel = two.engine.ranks.channel
        assert two.engine.step_channel == mode.replace("-", " ")
        assert _tokens(two) == want
        if mode == "shared-memory":
            assert channel.seq > 2 * channel.ring.slots and channel.ring.done == channel.seq  # wrapped around
            assert _gone(channel.ring.name)  # unlinked once every rank had mapped it


RANK0 = """
import sys, threading, time
sys.path.insert(0, {tests!r})
from helpers import engine_for
from kit.builder import BuildConfig
from kit.batch import ForwardBatch, SequenceInput
from kit.parallel import DistributedEngine
def start():
    return DistributedEngine.start(engine_for({path!r}).network, 2, build_config=BuildConfig(max_batch_size=4,
        max_seq_len=128, max_input_len=64, max_num_tokens=64), timeout_s=60, step_channel="shared-memory")
if {in_thread}:  # no death signal then: the rank must notice on its own that rank 0 is gone
    box = []
    t = threading.Thread(target=lambda: box.append(start()))
    t.start()
    t.join()
    engine = box[0]
else:
    engine = start()
kv = engine.allocate_kv_cache(4, 16)
engine.forward(ForwardBatch.build([SequenceInput([5, 6, 7], 0, [0])], 16), kv)
print(engine.pids[0], engine.ranks.channel.ring.name, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("in_thread", [False, True], ids=["death signal", "started in a thread"])
def test_a_killed_rank_0_takes_the_other_ranks_with_it_and_leaves_no_segment(llama, in_thread):
    """Started from the main thread, rank 1 gets SIGTERM when rank 0 dies; started from another thread (a
    notebook's, a server's) it has no death signal, and its wait on the ring sees rank 0's process gone."""
    script = RANK0.format(tests=str(Path(__file__).parent), path=llama, in_thread=in_thread)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get(
        "PYTHONPATH", "")])}
    rank0 = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        line = rank0.stdout.readline().split()
        assert len(line) == 2, "rank 0 did not start"
        pid, name = int(line[0]), line[1]
        assert process_start_time(pid) is not None
        os.kill(rank0.pid, signal.SIGKILL)
        rank0.wait(10)
        deadline = time.monotonic() + 30
        while process_start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_start_time(pid) is None, "rank 1 outlived rank 0"
        assert _gone(name)
    finally:
        if rank0.poll() is None:
            rank0.kill()
            rank0.wait(10)
