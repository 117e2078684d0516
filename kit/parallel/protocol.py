"""The step message: what rank 0 broadcasts to the other ranks, one per step.

A message is one int64 tensor: a 20-slot header, then the payload. For a forward step
the payload is the `ForwardBatch`'s seven index tensors back to back, so the other ranks
rebuild the same batch as views of the received buffer:

    header  cmd, kv_id, num_tokens, num_seqs, max_blocks, num_logits, max_query_len,
            max_seq_len, block_size, eager, timed, free_kv_id, extra_len, arg0, arg1, arg2,
            seq (messages sent so far, this one included), count (collectives rank 0 had
            issued before this message), 0, 0
    payload input_ids | positions | query_start_loc | seq_lens | block_tables | slot_mapping
            | logits_indices

The buffer has a fixed capacity sized from the build config (max_num_tokens, batch size,
blocks per sequence), so a step is ONE broadcast; a larger batch (a profiler's synthetic
one) sends `extra_len` in the header and its payload in a second broadcast.

NOTE: why a broadcast and not shared memory (nano-vllm writes a pickled batch into a
SharedMemory segment and wakes the ranks with Events): the batch already lives on
rank 0's device, NCCL moves it GPU to GPU in one call ordered on the stream with the
forward that follows (no host round trip, no pickling), the same call works across
hosts under torchrun where shared memory cannot, and on the CPU gloo does the same job.

A receiving rank checks `seq` and `count` against its own: a rank that missed a message
or ran other collectives than rank 0 (which would pair the wrong collectives, or hang)
fails at once with `CollectiveMismatch`, naming the rank and the step. `NOOP` is the
message rank 0 sends when idle (kit/parallel/distributed_engine.py), so that a waiting
rank's receive never outlives the process group's timeout.
"""

from __future__ import annotations

import torch

from kit.batch import ForwardBatch
from kit.parallel.comm import TensorParallelComm

__all__ = ["FORWARD", "ALLOC", "CAPTURE", "TIMINGS", "SHUTDOWN", "NOOP", "COMMANDS", "HEADER", "KV_DTYPES",
           "StepChannel", "CollectiveMismatch", "pack_batch", "unpack_batch", "message_capacity", "describe"]

FORWARD, ALLOC, CAPTURE, TIMINGS, SHUTDOWN, NOOP = 1, 2, 3, 4, 5, 6
COMMANDS = {FORWARD: "FORWARD", ALLOC: "ALLOC", CAPTURE: "CAPTURE", TIMINGS: "TIMINGS", SHUTDOWN: "SHUTDOWN",
            NOOP: "NOOP"}
HEADER = 20
SEQ, COUNT = 16, 17  # header slots
KV_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)  # allocate_kv_cache's dtype, by index


def message_capacity(build_config) -> int:
    """Payload slots a step of this build config can need (the seven tensors at their largest)."""
    bc = build_config
    t, s = bc.max_num_tokens, bc.max_batch_size
    max_blocks = -(-bc.max_seq_len // bc.block_size)
    return 4 * t + 2 * s + 1 + s * max_blocks


def pack_batch(batch: ForwardBatch) -> tuple[list[int], torch.Tensor]:
    """(header slots 2..8, payload (n,) int64) of a batch."""
    b = batch
    head = [b.num_tokens, b.num_seqs, int(b.block_tables.shape[1]), int(b.logits_indices.shape[0]),
            b.max_query_len, b.max_seq_len, b.block_size]
    payload = torch.cat([b.input_ids, b.positions, b.query_start_loc, b.seq_lens, b.block_tables.reshape(-1),
                         b.slot_mapping, b.logits_indices])
    return head, payload


def unpack_batch(head: list[int], payload: torch.Tensor) -> ForwardBatch:
    """The batch `pack_batch` packed, as views of `payload`."""
    t, s, m, n_logits, max_q, max_len, bs = head[2:9]
    parts = payload[:3 * t + 2 * s + 1 + s * m + n_logits].split([t, t, s + 1, s, s * m, t, n_logits])
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
        text += f" (kv {header[1]}, {header[2]} batch sizes, {header[13]} blocks)"
    return text


class StepChannel:
    """Rank 0 sends, the other ranks receive, one message per call, over `comm`."""

    def __init__(self, comm: TensorParallelComm, capacity: int) -> None:
        self.comm, self.capacity = comm, capacity
        self.buffer = torch.zeros(HEADER + capacity, dtype=torch.long, device=comm.device)
        self.seq = 0  # messages sent (rank 0) or received (the others)
        # NOTE: on a GPU, rank 0 writes the header from one of two pinned buffers without waiting: a copy
        # from pageable memory would wait for every kernel queued before it (the last step's graph), so
        # the host could never run ahead; an event says when a pinned buffer may be written again
        self._pinned: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        if comm.device.type == "cuda":
            self._pinned = [(torch.zeros(HEADER, dtype=torch.long).pin_memory(), torch.cuda.Event())
                            for _ in range(2)]

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
            header[12] = n
        elif n:
            self.buffer[HEADER:HEADER + n].copy_(payload, non_blocking=True)
        self._write_header(header)
        self.comm.broadcast(self.buffer)
        if n > self.capacity:
            self.comm.broadcast(payload.to(self.buffer.device).contiguous())

    def receive(self) -> tuple[list[int], torch.Tensor]:
        count = self.comm.count
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
        if header[12]:
            extra = torch.empty(header[12], dtype=torch.long, device=self.buffer.device)
            return header, self.comm.broadcast(extra)
        return header, self.buffer[HEADER:]
