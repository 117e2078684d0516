"""The speculative step around one target forward: propose drafts before it, verify them after.

The executor drives it (a speculating request always runs in the synchronous step):

    speculator.propose(scheduler, context_of)     drafts -> scheduler.set_draft_tokens(...)
    out = scheduler.schedule()                    a speculating decode gets 1 + d tokens, d <= k
    logits = engine.forward(batch)                all d + 1 rows of those sequences
    emitted = speculator.verify(out, logits, rows, context_of)
                                                  {request id: [(token, logprob, top logprobs), ...]}

which requests speculate: a decoding request whose sampling needs no per-token context
beyond the warpers. Penalties (repetition / presence / frequency) and a `min_tokens` not yet
reached change the logits with every accepted token, so those requests decode plainly in
the same batch (vLLM v1 makes the same exception). Greedy requests are verified by argmax,
random ones by the rejection rule (kit/speculative/verify.py) with their own generator, so a
seeded request is reproducible.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from kit.sampling import Sampler, SamplingContext
from kit.scheduler import Scheduler
from kit.scheduler_output import SchedulerOutput
from kit.speculative.configs import DecodingBaseConfig
from kit.speculative.stats import VerifyRecord, acceptance_frame
from kit.speculative.verify import verify_greedy, verify_rejection

__all__ = ["Speculator", "speculates"]

Emitted = list[tuple[int, float, dict[int, float] | None]]


def speculates(context: SamplingContext) -> bool:
    """True when this request's next tokens can be drafted and verified (see the module docstring)."""
    p = context.params
    return (p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
            and len(context.output_token_ids) >= p.min_tokens)


class Speculator:
    """A drafter (n-gram or draft model) plus the verification rule and the statistics."""

    def __init__(self, config: DecodingBaseConfig, drafter: Any, *, max_records: int = 10000) -> None:
        self.config = config
        self.drafter = drafter
        self.records: deque[VerifyRecord] = deque(maxlen=max_records)  # for the acceptance widget
        self._proposed: dict[str, tuple[list[int], torch.Tensor | None]] = {}
        self.step_counts = {"num_spec_requests": 0, "num_draft_tokens": 0, "num_accepted_draft_tokens": 0}
        self.num_draft_tokens = 0  # totals since the start
        self.num_accepted_draft_tokens = 0
        self.num_verify_steps = 0  # (request, target forward) pairs that verified drafts

    def attach(self, scheduler: Scheduler) -> None:
        """Serve this scheduler: a model drafter gets a KV pool of the target pool's geometry, and the
        drafter forgets every request the scheduler ends (stop, length, abort, error)."""
        kv = scheduler.kv_cache_manager
        if hasattr(self.drafter, "attach"):
            self.drafter.attach(kv.num_blocks, kv.block_size)
        scheduler.on_finish.append(lambda request_id: self.drafter.release((request_id,)))

    # ------------------------------------------------------------------ drafts
    def propose(self, scheduler: Scheduler, context_of: Callable[[str], SamplingContext | None]) -> None:
        """Draft for every decoding request that speculates; hand the drafts to the scheduler."""
        self._proposed.clear()
        self.step_counts = dict.fromkeys(self.step_counts, 0)
        self.release_finished(scheduler)
        cap = self.config.max_concurrency
        if cap is not None and scheduler.num_running > cap:  # TensorRT-LLM: no speculation above this batch size
            return
        items = []
        for req in scheduler.running:
            if req.is_prefill:
                continue
            ctx = context_of(req.request_id)
            k = min(self.config.max_draft_len, req.max_tokens - req.num_output_tokens - 1)
            if ctx is None or k < 1 or not speculates(ctx):
                continue
            items.append((req.request_id, req.all_token_ids, k, ctx))
        if not items:
            return
        for rid, (drafts, q) in self.drafter.propose(items).items():
            self._proposed[rid] = (drafts, q)
            scheduler.set_draft_tokens(rid, drafts)

    def release_finished(self, scheduler: Scheduler) -> None:
        """Free the drafter's state (pool entries, draft KV blocks) of requests the scheduler no longer has."""
        gone = [rid for rid in self.drafter.request_ids if scheduler.get(rid) is None]
        if gone:
            self.drafter.release(gone)

    # ------------------------------------------------------------------ verify
    def verify(self, out: SchedulerOutput, logits: torch.Tensor, rows: Sequence[tuple[int, int, bool]],
               context_of: Callable[[str], SamplingContext | None]) -> dict[str, tuple[Emitted, int]]:
        """Per speculating sequence: (the tokens it emits: its accepted drafts, then the target's token;
        the number of drafts it verified)."""
        greedy, rand = [], []
        for s, (first, n, _) in zip(out.scheduled, rows):
            d = s.num_draft_tokens
            ctx = context_of(s.request_id)
            if not d or ctx is None:
                continue
            drafts = list(s.token_ids[-d:])
            q = self._proposed.get(s.request_id, (None, None))[1]
            entry = (s.request_id, ctx, drafts, logits[first:first + n], None if q is None else q[:d])
            (greedy if ctx.params.is_greedy else rand).append(entry)
        emitted: dict[str, tuple[Emitted, int]] = {}
        for group, fn in ((greedy, self._verify_greedy), (rand, self._verify_random)):
            if group:
                for (rid, ctx, drafts, rows_, _), (a, nxt) in zip(group, fn(group)):
                    emitted[rid] = (self._emit(rid, ctx, drafts, rows_, a, nxt, out.step), len(drafts))
        return emitted

    def apply(self, out: SchedulerOutput, logits: torch.Tensor, rows: Sequence[tuple[int, int, bool]],
              output_processor: Any, sampled: dict, verdicts: dict, touched: dict) -> list[tuple[Any, Exception]]:
        """Verify, then give each speculating sequence's tokens to the executor's output processor (every
        stop check token by token); fill the executor's `sampled` / `verdicts` / `touched` of this step.
        Returns (request state, error) of requests that failed there (the executor fails them alone)."""
        failed = []
        for rid, (tokens, num_drafts) in self.verify(out, logits, rows, output_processor.context_of).items():
            state, comp = output_processor.owner(rid) or (None, None)
            if state is None or state.greq.request_id not in output_processor.states:
                continue
            try:
                n, verdict = output_processor.add_tokens(state, comp, tokens, num_drafts, len(tokens) - 1)
            except Exception as e:  # noqa: BLE001 - e.g. the detokenizer: this request fails alone
                failed.append((state, e))
                continue
            touched[state.greq.request_id] = state
            sampled[rid] = [t for t, _, _ in tokens[:n]]
            if verdict is not None:
                verdicts[rid] = verdict
        return failed

    @staticmethod
    def _pad(group: list, V: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        K = max(len(e[2]) for e in group)
        draft = torch.zeros(len(group), K, dtype=torch.long, device=device)  # (B, K)
        target = torch.zeros(len(group), K + 1, V, device=device)  # (B, K+1, V)
        for b, (_, _, drafts, rows_, _) in enumerate(group):
            draft[b, :len(drafts)] = torch.tensor(drafts, device=device)
            target[b, :rows_.shape[0]] = rows_.float()
        num = torch.tensor([len(e[2]) for e in group], device=device)
        return draft, target, num

    def _verify_greedy(self, group: list) -> list[tuple[int, int]]:
        V, dev = group[0][3].shape[1], group[0][3].device
        draft, target, num = self._pad(group, V, dev)
        a, nxt = verify_greedy(target.argmax(dim=-1), draft, num)
        return list(zip(a.tolist(), nxt.tolist()))

    def _verify_random(self, group: list) -> list[tuple[int, int]]:
        V, dev = group[0][3].shape[1], group[0][3].device
        draft, target, num = self._pad(group, V, dev)
        B, K = draft.shape
        p = torch.zeros_like(target)  # (B, K+1, V): the target's warped distributions
        q = None if self.drafter.is_deterministic else torch.zeros(B, K, V, device=dev)
        uniform = torch.ones(B, K, device=dev)
        noise = torch.ones(B, V, device=dev)
        for b, (_, ctx, drafts, rows_, qb) in enumerate(group):
            d = len(drafts)
            p[b, :d + 1] = Sampler.apply_warpers(rows_.float(), [ctx.params] * (d + 1)).softmax(dim=-1)
            if q is not None:
                q[b, :d] = qb
            # NOTE: this request's own generator (None: the default one), uniforms first, then the noise
            uniform[b, :d] = torch.rand(d, generator=ctx.generator, device=dev)
            noise[b] = torch.empty(V, device=dev).exponential_(generator=ctx.generator)
        a, nxt = verify_rejection(p, q, draft, num, uniform, noise)
        return list(zip(a.tolist(), nxt.tolist()))

    def _emit(self, rid: str, ctx: SamplingContext, drafts: list[int], rows_: torch.Tensor, a: int, nxt: int,
              step: int) -> Emitted:
        tokens = drafts[:a] + [nxt]
        lp = torch.log_softmax(rows_[:a + 1].float(), dim=-1)  # (a+1, V): raw logprobs, as the Sampler gives
        picked = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(1).tolist()
        k = ctx.params.logprobs
        tops: list[dict[int, float] | None] = [None] * len(tokens)
        if k is not None:
            vals, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            for j, t in enumerate(tokens):
                tops[j] = dict(zip(ids[j].tolist(), vals[j].tolist()))
                tops[j][t] = picked[j]
        self.records.append(VerifyRecord(rid, step, len(ctx.output_token_ids), tuple(drafts), a, nxt))
        c = self.step_counts
        c["num_spec_requests"] += 1
        c["num_draft_tokens"] += len(drafts)
        c["num_accepted_draft_tokens"] += a
        self.num_draft_tokens += len(drafts)
        self.num_accepted_draft_tokens += a
        self.num_verify_steps += 1
        return list(zip(tokens, picked, tops))

    # ------------------------------------------------------------------- views
    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def acceptance_frame(self, request_id: str | None = None, tokenizer: Any = None) -> pd.DataFrame:
        """Token by token, every verification kept (see kit/speculative/stats.py for the columns)."""
        recs = [r for r in self.records if request_id is None or r.request_id == request_id]
        return acceptance_frame(recs, tokenizer)

    def __repr__(self) -> str:
        return (f"Speculator({type(self.config).__name__}, {self.drafter!r}, drafted {self.num_draft_tokens}, "
                f"accepted {self.num_accepted_draft_tokens} ({self.acceptance_rate:.1%}))")

    def _repr_html_(self) -> str:
        return (f"<b>Speculator</b> {type(self.config).__name__} (max_draft_len {self.config.max_draft_len}) &middot; "
                f"{self.num_verify_steps} verifications &middot; drafted {self.num_draft_tokens}, accepted "
                f"{self.num_accepted_draft_tokens} ({self.acceptance_rate:.1%})")
