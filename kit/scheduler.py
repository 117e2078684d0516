"""In-flight (continuous) batching: which requests run this step, and how many tokens each.

There is no prefill phase and decode phase. A request has `num_computed_tokens` in the
KV cache and `num_tokens` known tokens; each step the scheduler gives it some of the
difference under two budgets, `max_batch_size` sequences and `max_num_tokens` tokens.
With max_num_tokens=16 and prompts of 20 (A), 6 (B) and 11 (C) tokens:

    step 1:  A prompt[0:16]                                  (a chunk: the token budget is spent)
    step 2:  A prompt[16:20]  B prompt[0:6]  C prompt[0:6]   (A and B sample their first token)
    step 3:  A decode (1)     B decode (1)   C prompt[6:11]  (decodes first, then chunks, then admissions)

Each `schedule()` is one iteration of the engine loop:

    out = scheduler.schedule()                   # SchedulerOutput: the only thing the executor reads
    sampled = run_model_and_sample(out)          # {request_id: token} for seqs with is_last_chunk
    finished_ids = scheduler.update(out, sampled, finished={rid: FINISHED_STOPPED, ...})

Order within a step: running requests first (their decode tokens, then continuing
chunked prefills, each in admission order), then waiting requests FCFS while a batch
slot, token budget and KV blocks allow. Two policies decide what "blocks allow" means
(the TensorRT-LLM capacity-scheduler names):

- GUARANTEED_NO_EVICT admits a request only if blocks for its whole budget
  (`prompt + max_tokens - 1` tokens, capped by `max_seq_len`), plus the blocks every
  running request may still need for its own budget, fit in the free pool. Nothing is
  ever preempted. A waiting head that does not fit blocks everyone behind it (strict
  FCFS, as in TensorRT-LLM), so it runs as soon as enough requests finish.
- MAX_UTILIZATION admits greedily by what the request needs *now*. When a running
  request cannot get a block for its next tokens, the most recently admitted running
  request is preempted: its blocks are freed, `num_computed_tokens` goes back to 0, it
  is put at the FRONT of the waiting queue (status PREEMPTED) and later recomputed, its
  generated tokens included, so its output never changes. A waiting head that lacks
  blocks may be passed by later requests for at most `max_bypass_steps` steps; after
  that it blocks admission until it fits, so no request starves under a stream.

A request whose budget cannot fit the whole pool is rejected (FINISHED_ERROR, in
`SchedulerOutput.rejected`). Without chunked prefill a prompt is scheduled whole or not at
all (a preempted request longer than `max_num_tokens` is recomputed in such chunks).

n > 1 completions: `fork(parent_id, child)` queues a child that already shares the
parent's full prompt blocks. If nothing can run because waiting children hold the
blocks, the last child's blocks are released and it is recomputed later (from the
prefix cache when enabled), so forks never deadlock the pool.
Modelled on vLLM v1's `Scheduler` and nano-vllm's `Scheduler`. No tensors here. Its
config and the per-step output types are in kit/scheduler_output.py.
"""

from __future__ import annotations

from collections import deque
from operator import itemgetter
from typing import Callable, Mapping, Sequence

from kit.kv_cache import KVCacheManager
from kit.request import Request, RequestStatus, beam_extra_blocks, beam_tokens
from kit.scheduler_update import StepUpdates
from kit.scheduler_output import (PLACEHOLDER_TOKEN, ScheduledSequence, SchedulerConfig, SchedulerOutput,
                                  SchedulerPolicy)

__all__ = ["PLACEHOLDER_TOKEN", "Scheduler", "SchedulerConfig", "SchedulerOutput", "SchedulerPolicy",
           "ScheduledSequence"]


class Scheduler(StepUpdates):
    """Decides each step's batch; owns request state and drives the `KVCacheManager`.

    The executor calls `add_request` / `fork` / `finish` between steps and
    `schedule` + `update` once per step. Not thread-safe: the executor's loop owns it.
    """

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.waiting: deque[Request] = deque()  # FCFS; preempted and forked requests go in front
        self.running: list[Request] = []  # in admission order: the last one is the preemption victim
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._rejected: list[tuple[str, str]] = []  # to report in the next SchedulerOutput
        self._forked: set[str] = set()  # waiting children that already hold shared blocks
        self._blocked: tuple[str, int] | None = None  # (waiting head lacking blocks, steps it was bypassed)
        self._draft_tokens: dict[str, list[int]] = {}  # speculative drafts for the next schedule() only
        self.on_finish: list[Callable[[str], None]] = []  # called with the id of every request that ends
        self.num_steps = 0
        self.num_preemptions = 0

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        """True while a request waits or runs, or a rejection is still to be reported."""
        return bool(self.waiting or self.running or self._rejected)

    def get(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    # ---- adding and ending requests -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request (ValueError if it is malformed or can never be scheduled whole)."""
        self._validate_new(request)
        self._enqueue(request, front=False)

    def fork(self, parent_id: str, child: Request) -> int:
        """Queue `child` sharing the parent's full computed blocks (n > 1 completions).

        Recipe: after the `update` in which the parent sampled its first token, build each
        child with the parent's prompt and its own first token (sampled from the same
        logits row) in `output_token_ids`, then fork it. The child skips the shared blocks
        and recomputes only the parent's partial tail block plus its own token. Children go
        to the front of the waiting queue, in fork order. Returns the shared token count
        (0 if the parent holds no blocks yet: the child is then queued like a new request).
        """
        parent = self._requests.get(parent_id)
        if parent is None:
            raise ValueError(f"fork: unknown or finished parent {parent_id!r}")
        self._validate_new(child)
        if self.kv_cache_manager.has_request(parent_id):
            self.kv_cache_manager.fork(parent, child)
            child.num_cached_tokens = child.num_computed_tokens
        self._enqueue(child, front=True)
        return child.num_computed_tokens

    def set_draft_tokens(self, request_id: str, token_ids: list[int]) -> None:
        """Speculative decoding: drafts to verify after this decoding request's newest token, in the
        next `schedule()` only. It schedules 1 + d tokens (d <= len(token_ids), cut to the token budget
        and to the request's KV budget), and `update` takes the list of tokens the step emitted."""
        self._draft_tokens[request_id] = list(token_ids)

    def finish(self, request_id: str, status: RequestStatus) -> bool:
        """End a request in any state (stop, abort, error): free its blocks, drop it from the queues.

        Returns False (a no-op) for an unknown or already finished request.
        """
        if not status.is_finished:
            raise ValueError(f"finish: status must be a FINISHED_* status, got {status}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._forked.discard(request_id)
        self.kv_cache_manager.free(request_id)
        request.status = status
        for callback in self.on_finish:
            callback(request_id)
        return True

    def _validate_new(self, request: Request) -> None:
        rid, cfg = request.request_id, self.config
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in the scheduler")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if not 0 <= request.num_output_tokens < request.max_tokens:
            raise ValueError(f"request {rid!r}: max_tokens={request.max_tokens} leaves nothing to generate "
                             f"after its {request.num_output_tokens} output tokens")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {rid!r} is not new (status {request.status.name}, "
                             f"{request.num_computed_tokens} computed tokens)")
        if not cfg.enable_chunked_prefill and request.num_tokens > cfg.max_num_tokens:
            raise ValueError(f"request {rid!r} has a {request.num_tokens}-token prompt but max_num_tokens="
                             f"{cfg.max_num_tokens} and enable_chunked_prefill=False: enable chunked prefill "
                             "or raise max_num_tokens")
        if cfg.max_seq_len is not None and request.num_tokens >= cfg.max_seq_len:
            raise ValueError(f"request {rid!r} has {request.num_tokens} tokens: no room to generate within "
                             f"max_seq_len={cfg.max_seq_len}")

    def _enqueue(self, request: Request, front: bool) -> None:
        self._requests[request.request_id] = request
        kv = self.kv_cache_manager
        need = self._num_budget_blocks(request)
        if need > kv.num_blocks:
            self._requests.pop(request.request_id)
            kv.free(request)
            request.status = RequestStatus.FINISHED_ERROR
            self._rejected.append((request.request_id, (
                f"needs {need} KV blocks for prompt+max_tokens ({self._max_kv_tokens(request) + 1} tokens) "
                f"but the cache has {kv.num_blocks} blocks of {kv.block_size} tokens")))
        elif front:  # after the children forked before it, ahead of everyone else
            i = 0
            while i < len(self.waiting) and self.waiting[i].request_id in self._forked:
                i += 1
            self.waiting.insert(i, request)
            self._forked.add(request.request_id)
        else:
            self.waiting.append(request)

    def _max_kv_tokens(self, request: Request) -> int:
        """Most tokens the request will ever hold in the cache (its last sampled token never is)."""
        total = request.num_prompt_tokens + request.max_tokens
        if self.config.max_seq_len is not None:
            total = min(total, self.config.max_seq_len)
        return max(total, request.num_tokens + 1) - 1

    def _num_budget_blocks(self, request: Request) -> int:
        max_kv = self._max_kv_tokens(request)  # beam search: plus the other beams' blocks (kit/beam_search.py)
        return self.kv_cache_manager.num_blocks_for(max_kv) + beam_extra_blocks(request, self.kv_cache_manager.block_size, max_kv)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences, allocating their KV slots (and preempting if the policy allows)."""
        self.num_steps += 1
        kv, policy = self.kv_cache_manager, self.config.policy
        budget = self.config.max_num_tokens
        entries: dict[str, tuple[Request, int, bool]] = {}  # id -> (request, num tokens, was prefill)
        preempted: list[str] = []
        drafts, self._draft_tokens = self._draft_tokens, {}
        scheduled_drafts: dict[str, list[int]] = {}  # id -> drafts scheduled this step
        starved = False  # a running request got no tokens: admit nobody, so it is served next
        # 1. running requests: decodes first, then continuing prefills, each in admission order
        # NOTE: is_prefill is read once per request (the sort key, with the tokens left to compute), and carried
        # into the entry; it is `Request.is_prefill` inlined (no outputs yet, or more than the newest token left)
        keyed = [(left > 1 or not r.output_token_ids, left, r) for r in self.running
                 for left in (len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens,)]
        for was_prefill, left, req in sorted(keyed, key=itemgetter(0)):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if was_prefill:
                n = self._num_tokens_to_schedule(req, req.num_computed_tokens, budget)
                cost = beam_tokens(req, n)  # beam search: every beam computes its token (kit/beam_search.py)
            else:  # NOTE: a decode (its newest token, one per beam), inlined: this loop runs per request per step
                n = min(left, budget)  # NOTE: preemption in this loop changes only the victims, which it skips
                cost = n * req.beam_width
            if n == 0 or cost > budget:
                starved = True
                continue
            d = self._num_drafts(req, was_prefill, drafts.get(req.request_id, ()), budget - n) if drafts else 0
            # NOTE: a decode that cannot get slots for its drafts decodes plainly (it never preempts for drafts)
            if d and kv.allocate_slots(req, n + d) is not None:
                scheduled_drafts[req.request_id] = drafts[req.request_id][:d]
                entries[req.request_id] = (req, n + d, was_prefill)
                budget -= n + d
                continue
            while kv.allocate_slots(req, n) is None:
                if policy is SchedulerPolicy.GUARANTEED_NO_EVICT:
                    raise RuntimeError(f"GUARANTEED_NO_EVICT: no block for running request {req.request_id!r}; "
                                       "the reservation was broken (was the KV cache changed from outside?)")
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim.request_id in entries:
                    budget += entries.pop(victim.request_id)[1]
                if victim is req:
                    break
            else:
                entries[req.request_id] = (req, n, was_prefill)
                budget -= cost
        # 2. waiting requests (not in a step that preempted: the pool is short already)
        if not preempted and not starved:
            budget = self._admit(budget, entries)
        # 3. nothing runs and nothing could be admitted: waiting forked children hold the blocks
        #    (release the last one's: it will be recomputed), or the head can never fit (reject it)
        if not entries and not self.running and self.waiting and not preempted:
            holder = next((r for r in reversed(self.waiting) if kv.has_request(r.request_id)), None)
            if holder is not None:
                kv.free(holder)
                holder.num_computed_tokens = 0
                self._forked.discard(holder.request_id)
            else:
                head = self.waiting[0]
                self.finish(head.request_id, RequestStatus.FINISHED_ERROR)
                self._rejected.append((head.request_id, "cannot get KV blocks even with nothing running"))
        return self._output(entries, preempted, scheduled_drafts)

    def _num_drafts(self, req: Request, was_prefill: bool, drafts: Sequence[int], budget: int) -> int:
        """Drafts a decode step may verify: within the token budget and the request's KV budget, so a
        speculating request never holds more blocks than its reservation (prompt + max_tokens - 1)."""
        if was_prefill or not drafts:
            return 0
        return max(0, min(len(drafts), budget, self._max_kv_tokens(req) - req.num_tokens))

    def _num_tokens_to_schedule(self, req: Request, num_computed: int, budget: int) -> int:
        pending = req.num_tokens - num_computed
        if self.config.enable_chunked_prefill:
            return min(pending, budget)
        n = min(pending, self.config.max_num_tokens)  # whole, or a full-budget recompute chunk
        return n if n <= budget else 0

    def _admit(self, budget: int, entries: dict[str, tuple[Request, int, bool]]) -> int:
        cfg, kv = self.config, self.kv_cache_manager
        if not self.waiting or len(self.running) >= cfg.max_batch_size or budget == 0:
            self._blocked = None  # nobody can be admitted this step, so nobody is bypassed
            return budget
        guaranteed = cfg.policy is SchedulerPolicy.GUARANTEED_NO_EVICT
        # blocks the running requests may still allocate for their whole budgets
        reserved = sum(self._num_budget_blocks(r) - len(kv.block_table(r.request_id)) for r in self.running)
        admitted: list[Request] = []
        first_blocked: Request | None = None
        bypassed = False
        for req in list(self.waiting):
            if len(self.running) >= cfg.max_batch_size or budget == 0:
                break
            rid = req.request_id
            holds_blocks = kv.has_request(rid)  # a forked child
            if holds_blocks:
                computed, num_computed = None, req.num_computed_tokens
            else:
                computed, num_computed = kv.get_computed_blocks(req)
            n = self._num_tokens_to_schedule(req, num_computed, budget)
            if n == 0:
                break  # token budget: strict FCFS
            if guaranteed:
                need = kv.get_num_blocks_to_allocate(req, self._max_kv_tokens(req), computed)
                need += beam_extra_blocks(req, kv.block_size, self._max_kv_tokens(req))  # beam search
                if reserved + need > kv.num_free_blocks:
                    break  # head-of-line blocking
            if kv.allocate_slots(req, n, computed) is None:
                if guaranteed:
                    break
                if first_blocked is None:
                    first_blocked = req
                    steps = self._blocked[1] if self._blocked and self._blocked[0] == rid else 0
                    if steps >= cfg.max_bypass_steps:
                        break
                continue
            bypassed = bypassed or first_blocked is not None
            if not holds_blocks:
                req.num_computed_tokens = num_computed
                if req.status is RequestStatus.WAITING:
                    req.num_cached_tokens = num_computed
            reserved += self._num_budget_blocks(req) - len(kv.block_table(rid))
            admitted.append(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._forked.discard(rid)
            entries[rid] = (req, n, req.is_prefill)
            budget -= n
        if admitted:
            ids = {r.request_id for r in admitted}
            self.waiting = deque(r for r in self.waiting if r.request_id not in ids)
        if first_blocked is None:
            self._blocked = None
        elif bypassed:
            rid = first_blocked.request_id
            self._blocked = (rid, self._blocked[1] + 1 if self._blocked and self._blocked[0] == rid else 1)
        return budget

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv_cache_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _output(self, entries: dict[str, tuple[Request, int, bool]], preempted: list[str],
                drafts: dict[str, list[int]]) -> SchedulerOutput:
        kv = self.kv_cache_manager
        seqs, num_prefill, num_decode = [], 0, 0
        for req, n, was_prefill in entries.values():
            rid, start = req.request_id, req.num_computed_tokens
            d = drafts.get(rid, ()) if drafts else ()
            if not was_prefill and not d:  # NOTE: a decode: its newest token, positional (the common case)
                seqs.append(ScheduledSequence.decode(rid, req.output_token_ids[-1], start, tuple(kv.block_table(rid))))
                num_decode += n * req.beam_width  # beam search: one token per beam
                continue
            seqs.append(ScheduledSequence(
                request_id=rid,
                token_ids=tuple(req.token_ids_between(start, start + n - len(d))) + tuple(d),
                num_computed_tokens=start,
                block_table=tuple(kv.block_table(rid)),
                is_last_chunk=start + n - len(d) == req.num_tokens,
                num_draft_tokens=len(d),
            ))
            if was_prefill:
                num_prefill += n
            else:
                num_decode += beam_tokens(req, n)  # beam search: one token per beam
        rejected, self._rejected = tuple(self._rejected), []
        return SchedulerOutput(
            scheduled=tuple(seqs), num_prefill_tokens=num_prefill, num_decode_tokens=num_decode,
            preempted_request_ids=tuple(preempted), rejected=rejected, num_waiting=len(self.waiting),
            kv_blocks_used=kv.num_used_blocks, step=self.num_steps,
        )

    def _repr_html_(self) -> str:
        def rows(reqs) -> str:
            return "".join(f"<tr><td>{r.request_id}</td><td>{r.status.name}</td><td>{r.num_prompt_tokens}</td>"
                           f"<td>{r.num_output_tokens}/{r.max_tokens}</td><td>{r.num_computed_tokens}</td>"
                           f"<td>{r.num_preemptions}</td></tr>" for r in list(reqs)[:20])
        head = "<tr><th>request</th><th>status</th><th>prompt</th><th>output</th><th>computed</th><th>preempted</th></tr>"
        c = self.config
        chunked = "on" if c.enable_chunked_prefill else "off"
        return (f"<b>Scheduler</b> {c.policy.name} &middot; max_batch_size {c.max_batch_size} &middot; max_num_tokens "
                f"{c.max_num_tokens} &middot; chunked prefill {chunked} &middot; "
                f"{self.num_steps} steps, {self.num_preemptions} preemptions"
                f"<table>{head}{rows(self.running)}{rows(self.waiting)}</table>")

    def __repr__(self) -> str:
        return (f"Scheduler({self.config.policy.name}, running={self.num_running}, waiting={self.num_waiting}, "
                f"steps={self.num_steps}, preemptions={self.num_preemptions})")
