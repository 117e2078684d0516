"""Applying a computed step to the `Scheduler`: `update` (synchronous), `advance` + `commit` (overlapped).

`update(out, sampled, finished)` takes a step whose tokens are known: computed tokens move on,
sampled tokens are appended (a list of them for a sequence that verified speculative drafts,
whose rejected slots are rolled back), verdicts and the length limit end requests. The
overlapped loop (kit/executor_loop.py) splits it: `advance(out)` right after the launch, with a
placeholder per new token, and `commit(placeholders, sampled, finished)` once they are known.
A mixin of `Scheduler` (kit/scheduler.py), which holds the state these methods use.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from kit.request import RequestStatus, length_finished
from kit.scheduler_output import PLACEHOLDER_TOKEN, SchedulerOutput

__all__ = ["StepUpdates"]


def _fills_a_block(before: int, after: int, block_size: int) -> bool:
    """True if computed tokens going from `before` to `after` complete a block (only then is one hashed).

    NOTE: `KVCacheManager.cache_full_blocks` reads every token of the request: calling it only when a
    block fills keeps a decode step's work per request constant instead of growing with its length.
    A block it skips (a prefix-cache hit's, already registered) is hashed at the next block boundary.
    """
    return after // block_size > before // block_size


class StepUpdates:
    """`update`, `advance` and `commit` of the `Scheduler` (see the module docstring)."""

    def update(self, output: SchedulerOutput, sampled: Mapping[str, int | None],
               finished: Mapping[str, RequestStatus] | None = None) -> tuple[str, ...]:
        """Apply a computed step: advance `num_computed_tokens`, append sampled tokens, end requests.

        `sampled` maps each sequence with `is_last_chunk` to its new token (mid-prefill
        sequences: None or absent); a sequence that verified drafts maps to the list of tokens it
        emitted (accepted drafts, then the target's token; fewer if a stop cut them), and its
        slots past the accepted tokens are rolled back. `finished` holds the executor's verdicts for this step
        (stop token / stop string -> FINISHED_STOPPED, failure -> FINISHED_ERROR); they win
        over the length check, which ends a request with FINISHED_LENGTH at `max_tokens`
        outputs or `max_seq_len` tokens. Full blocks are hashed into the prefix cache here.
        Sequences finished since `schedule()` are skipped. Returns the ids finished here.
        """
        finished = dict(finished or {})
        live = []
        for seq in output.scheduled:  # validate everything before changing anything
            req = self._requests.get(seq.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            if req.num_computed_tokens != seq.num_computed_tokens:
                raise RuntimeError(f"update: stale SchedulerOutput for {seq.request_id!r} (has "
                                   f"{req.num_computed_tokens} computed tokens, the output says "
                                   f"{seq.num_computed_tokens})")
            token = sampled.get(seq.request_id)
            if seq.is_last_chunk and token is None:
                raise ValueError(f"update: no sampled token for {seq.request_id!r}, whose last chunk was computed")
            if not seq.is_last_chunk and token is not None:
                raise ValueError(f"update: {seq.request_id!r} is mid-prefill; its sampled token must be None")
            if isinstance(token, (list, tuple)) and not 1 <= len(token) <= seq.num_draft_tokens + 1:
                raise ValueError(f"update: {seq.request_id!r} verified {seq.num_draft_tokens} drafts, so it emits 1 to "
                                 f"{seq.num_draft_tokens + 1} tokens; got {len(token)}")
            live.append((req, seq, token))
        done: list[str] = []
        for req, seq, token in live:
            tokens = token if isinstance(token, (list, tuple)) else (token,)
            # NOTE: drafts count as computed only as far as they were accepted (len(tokens) - 1 of them)
            req.num_computed_tokens += len(seq.token_ids) - seq.num_draft_tokens + max(0, len(tokens) - 1)
            if seq.num_draft_tokens:
                self.kv_cache_manager.rollback(req, req.num_computed_tokens)
            if _fills_a_block(seq.num_computed_tokens, req.num_computed_tokens, self.kv_cache_manager.block_size):
                self.kv_cache_manager.cache_full_blocks(req)
            if token is None:
                continue
            req.output_token_ids.extend(int(t) for t in tokens)
            status = finished.pop(req.request_id, None)
            # NOTE: the same length rule the executor's output processor decides with; here it guards the
            # KV reservation for callers that pass no verdicts (the executor's verdict always comes first)
            if status is None and length_finished(req.num_output_tokens, req.max_tokens, req.num_tokens,
                                                  self.config.max_seq_len):
                status = RequestStatus.FINISHED_LENGTH
            if status is not None and self.finish(req.request_id, status):
                done.append(req.request_id)
        for rid, status in finished.items():
            if self.finish(rid, status):
                done.append(rid)
        return tuple(done)

    def advance(self, output: SchedulerOutput) -> dict[str, int]:
        """Apply a launched step whose tokens are not known yet (overlapped scheduling).

        `update` without the token values: computed tokens move on, full blocks are hashed (so
        earlier steps must be committed), each `is_last_chunk` sequence gets `PLACEHOLDER_TOKEN`
        as its newest output and a request at its length limit ends (FINISHED_LENGTH). Returns
        {request_id: placeholder index in output_token_ids} for `commit`.
        """
        placeholders: dict[str, int] = {}
        requests, kv, max_seq_len = self._requests, self.kv_cache_manager, self.config.max_seq_len
        running = RequestStatus.RUNNING
        for seq in output.scheduled:
            rid = seq.request_id
            req = requests.get(rid)
            if req is None or req.status is not running:
                continue  # finished (or preempted) since it was scheduled: its slot in the step is discarded
            before = req.num_computed_tokens
            if before != seq.num_computed_tokens:
                raise RuntimeError(f"advance: stale SchedulerOutput for {rid!r} (has {before} computed tokens, "
                                   f"the output says {seq.num_computed_tokens})")
            req.num_computed_tokens = after = before + len(seq.token_ids)
            if _fills_a_block(before, after, kv.block_size):
                kv.cache_full_blocks(req)
            if not seq.is_last_chunk:
                continue
            out = req.output_token_ids
            placeholders[rid] = len(out)
            out.append(PLACEHOLDER_TOKEN)
            if length_finished(len(out), req.max_tokens, len(req.prompt_token_ids) + len(out), max_seq_len):
                self.finish(rid, RequestStatus.FINISHED_LENGTH)
        return placeholders

    def gone(self, request_ids: Iterable[str]) -> list[str]:
        """The ids among `request_ids` that are no longer in the scheduler (finished, aborted), in order."""
        requests = self._requests
        return [rid for rid in request_ids if rid not in requests]

    def commit(self, placeholders: Mapping[str, int], sampled: Mapping[str, int],
               finished: Mapping[str, RequestStatus] | None = None) -> tuple[str, ...]:
        """The tokens of an `advance`d step are known: write them over their placeholders, apply verdicts.

        Ids gone from the scheduler (aborted, ended a step before) are skipped. Returns those finished here.
        """
        requests = self._requests
        for rid, token in sampled.items():
            req = requests.get(rid)
            index = placeholders.get(rid)
            if req is not None and index is not None and index < len(req.output_token_ids):
                req.output_token_ids[index] = int(token)
        done = []
        for rid, status in (finished or {}).items():
            if self.finish(rid, status):
                done.append(rid)
        return tuple(done)
