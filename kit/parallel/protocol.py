"""The step message: what rank 0 sends to the other ranks, one per step.

A message is a 20-slot int64 header, then a payload. For a forward step the payload is
the `ForwardBatch`'s seven index tensors back to back, so the other ranks rebuild the
same batch as views of the received buffer:

    header  cmd, kv_id, num_tokens, num_seqs, max_blocks, num_logits, max_query_len,
            max_seq_len, block_size, eager, timed, free_kv_id, extra_len, arg0, arg1, arg2,
            seq (messages sent so far, this one included), count (collectives rank 0 had
            issued before this message), payload_len, 0
    payload input_ids | positions | query_start_loc | seq_lens | block_tables | slot_mapping
            | logits_indices

Two paths, chosen at start-up (kit/parallel/distributed_engine.py; `KIT_TP_CHANNEL`):

* shared memory (every rank on rank 0's host, the default there): the header goes through
  a `HeaderRing` (kit/parallel/host_channel.py), host to host; the payload, which lives on
  rank 0's device (under overlap scheduling it holds tokens sampled on the device), follows
  in one broadcast of exactly `payload_len` slots, and no message but a step's carries one.
  A receiving rank never waits for its device: it reads the header, enqueues the broadcast,
  unpacks views and launches the step, so its host runs ahead of its GPU as rank 0's does.
* broadcast (ranks on several hosts under torchrun, or forced): header and payload in one
  broadcast of a buffer of fixed capacity (sized from the build config); the receiver copies
  the header to the host (`tolist()`), which waits for the broadcast. A payload larger than
  the capacity (a profiler's synthetic batch) sends `extra_len` in the header and follows in a
  second broadcast.

NOTE: why not the broadcast alone (measured on 2x H200, Llama-3.1-8B, decode at batch 1:
TP=2 took 4.05 ms a step where the graph needs about 2.5 ms): a broadcast is stream-ordered,
so on rank 0 it is queued behind the previous step's graph, and a rank learns of step N+1
only when step N is over on both GPUs; its host must then unpack the batch, copy the graph's
inputs and launch the replay while rank 0's graph, already launched, waits in its first
all-reduce: every step paid the rank's host latency as a GPU bubble. nano-vllm sends each
step through SharedMemory and Events, vLLM through a shared-memory message queue; here only
the header goes through shared memory, the batch stays on the device.

A receiving rank checks `seq` and `count` against its own: a rank that missed a message
or ran other collectives than rank 0 (which would pair the wrong collectives, or hang)
fails at once with `CollectiveMismatch`, naming the rank and the step. `NOOP` is the
message rank 0 sends when idle (kit/parallel/ranks.py), so that a waiting rank's wait never
outlives its watchdog's stage timeout (nor, on the broadcast path, the process group's).
"""

from __future__ import annotations

import torch

from kit.batch import ForwardBatch, split_aligned
from kit.parallel.comm import TensorParallelComm
from kit.parallel.host_channel import HeaderRing

__all__ = ["FORWARD", "ALLOC", "CAPTURE", "TIMINGS", "SHUTDOWN", "NOOP", "COMMANDS", "HEADER", "KV_DTYPES",
           "SEQ", "COUNT", "EXTRA", "LENGTH", "StepChannel", "CollectiveMismatch", "pack_batch", "unpack_batch", "message_capacity", "describe"]

FORWARD, ALLOC, CAPTURE, TIMINGS, SHUTDOWN, NOOP = 1, 2, 3, 4, 5, 6
COMMANDS = {FORWARD: "FORWARD", ALLOC: "ALLOC", CAPTURE: "CAPTURE", TIMINGS: "TIMINGS", SHUTDOWN: "SHUTDOWN",
            NOOP: "NOOP"}
HEADER = 20
EXTRA, SEQ, COUNT, LENGTH = 12, 16, 17, 18  # header slots
KV_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)  # allocate_kv_cache's dtype, by index


def message_capacity(build_config) -> int:
    """Payload slots a step of this build config can need (the seven tensors at their largest, each padded
    to an even length)."""
    bc = build_config
    t, s = bc.max_num_tokens, bc.max_batch_size
    max_blocks = -(-bc.max_seq_len // bc.block_size)
    return 4 * t + 2 * s + 1 + s * max_blocks + 7


def pack_batch(batch: ForwardBatch) -> tuple[list[int], torch.Tensor]:
    """(header slots 2..8, payload (n,) int64) of a batch.

    NOTE: each part starts at an even slot (an odd-length part is followed by one unused slot), so that the
    views `unpack_batch` makes on the other ranks are 16-byte aligned like rank 0's (kit/batch.py: Triton
    specializes kernels on pointer alignment; views at odd offsets compiled new variants mid-run)."""
    b = batch
    head = [b.num_tokens, b.num_seqs, int(b.block_tables.shape[1]), int(b.logits_indices.shape[0]),
            b.max_query_len, b.max_seq_len, b.block_size]
    parts = [b.input_ids, b.positions, b.query_start_loc, b.seq_lens, b.block_tables.reshape(-1),
             b.slot_mapping, b.logits_indices]
    pad = b.input_ids.new_zeros(1)
    payload = torch.cat([x for p in parts for x in ((p, pad) if p.numel() & 1 else (p,))])
    return head, payload


def unpack_batch(head: list[int], payload: torch.Tensor) -> ForwardBatch:
    """The batch `pack_batch` packed, as views of `payload`."""
    t, s, m, n_logits, max_q, max_len, bs = head[2:9]
    parts = split_aligned(payload, [t, t, s + 1, s, s * m, t, n_logits])
    return ForwardBatch(parts[0], parts[1], parts[2], parts[3], parts[4].view(s, m), parts[5], parts[6],
                        max_query_len=max_q, max_seq_len=max_len, block_size=bs)


class CollectiveMismatch(RuntimeError):
    """A rank received a message out of order, or had issued other collectives than rank 0."""


def describe(header: list[int]) -> str:
    """'step 12 FORWARD (decode, 64 seqs, graphed)': a message, for logs and errors."""
    cmd = header[0]
    text = f"step {header[SEQ]} {COMMANDS.get(cmd, f'command {cmd}')}"
    if cmd == FORWARD:
        kind = "decode" if header[6] == 1 else "prefill"
        text += f" ({kind}, {header[2]} tokens, {header[3]} seqs{', eager' if header[9] else ''}, kv {header[1]})"
    elif cmd == ALLOC:
        text += f" (kv {header[1]}: {header[13]} blocks of {header[14]})"
    elif cmd == CAPTURE:
        text += f" (kv {header[1]}, {header[2]} batch sizes, {header[14]} mixed-step buckets, {header[13]} blocks)"
    return text


class StepChannel:
    """Rank 0 sends, the other ranks receive, one message per call: the header by `ring` when there is one
    (shared memory), else by broadcast over `comm`; the payload always by broadcast."""

    def __init__(self, comm: TensorParallelComm, capacity: int, ring: HeaderRing | None = None) -> None:
        self.comm, self.capacity, self.ring = comm, capacity, ring
        self.buffer = torch.zeros(HEADER + capacity, dtype=torch.long, device=comm.device)
        self.seq = 0  # messages sent (rank 0) or received (the others)
        # NOTE: on a GPU, the broadcast path's rank 0 writes the header from one of two pinned buffers without
        # waiting: a copy from pageable memory would wait for every kernel queued before it (the last step's
        # graph), so the host could never run ahead; an event says when a pinned buffer may be written again
        self._pinned: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        if comm.device.type == "cuda":
            self._pinned = [(torch.zeros(HEADER, dtype=torch.long).pin_memory(), torch.cuda.Event())
                            for _ in range(2)]

    @property
    def path(self) -> str:
        """'shared memory' (headers through the host ring) or 'broadcast'."""
        return "broadcast" if self.ring is None else "shared memory"

    def close(self) -> None:
        """Unmap the ring (rank 0 also unlinks it, if not done yet); the channel sends nothing more."""
        if self.ring is not None:
            self.ring.close()

    def _write_header(self, header: list[int]) -> None:
        if not self._pinned:
            self.buffer[:HEADER].copy_(torch.tensor(header, dtype=torch.long))
            return
        host, done = self._pinned[self.seq % 2]
        done.synchronize()  # the copy out of this buffer two messages ago (long finished, as a rule)
        host.numpy()[:] = header
        self.buffer[:HEADER].copy_(host, non_blocking=True)
        done.record()

    def send(self, header: list[int], payload: torch.Tensor | None = None) -> None:
        header = list(header) + [0] * (HEADER - len(header))
        self.seq += 1
        header[SEQ], header[COUNT] = self.seq, self.comm.count
        if self.comm.tracing:
            self.comm.note(f"send {describe(header)}")
        n = 0 if payload is None else payload.numel()
        if n > self.capacity:
            header[EXTRA] = n
        if self.ring is not None:  # the header from the host, now; then the payload, exactly n slots
            header[LENGTH] = n
            self.ring.write(header)
            if n:
                self.comm.broadcast(payload.to(self.comm.device).reshape(-1).contiguous())
            return
        if 0 < n <= self.capacity:
            self.buffer[HEADER:HEADER + n].copy_(payload, non_blocking=True)
        self._write_header(header)
        self.comm.broadcast(self.buffer)
        if n > self.capacity:
            self.comm.broadcast(payload.to(self.buffer.device).contiguous())

    def receive(self) -> tuple[list[int], torch.Tensor]:
        """(header, payload): on the shared-memory path nothing here waits for the device (the payload is
        a view of a broadcast still in flight, ordered on the stream before whatever reads it)."""
        count = self.comm.count
        if self.ring is not None:
            header = self.ring.read()
        else:
            self.comm.broadcast(self.buffer)
            header = self.buffer[:HEADER].tolist()
        self.seq += 1
        if self.comm.tracing:
            self.comm.note(f"received {describe(header)}")
        if header[SEQ] != self.seq or header[COUNT] != count:
            raise CollectiveMismatch(
                f"rank {self.comm.rank}: {describe(header)}: rank 0 sent message {header[SEQ]} after "
                f"{header[COUNT]} collectives; this rank expected message {self.seq} and had issued {count}: the "
                f"ranks ran different collectives since the last message")
        if self.ring is not None:
            n = header[LENGTH]
            if n == 0:
                return header, self.buffer[HEADER:HEADER]
            out = self.buffer[HEADER:HEADER + n] if n <= self.capacity else torch.empty(
                n, dtype=torch.long, device=self.buffer.device)
            return header, self.comm.broadcast(out)
        if header[EXTRA]:
            extra = torch.empty(header[EXTRA], dtype=torch.long, device=self.buffer.device)
            return header, self.comm.broadcast(extra)
        return header, self.buffer[HEADER:]
