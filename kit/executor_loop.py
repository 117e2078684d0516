"""The executor's iteration, synchronous or overlapped: `StepLoop`, the base class of `Executor`.

A step is launched, advanced, then resolved:

    launch   schedule -> ForwardBatch -> forward -> sampler pass  (device work queued; no wait)
    advance  scheduler.advance(out): computed tokens move on, a placeholder per new token
    resolve  wait for that step's sampled tokens (one pinned copy + its event) -> stop checks,
             detokenization -> scheduler.commit(tokens, verdicts) -> publish

Synchronous (`overlap=False`): launch, advance, resolve, then the next step. Overlapped
(TensorRT-LLM's overlap scheduler, vLLM v1's async scheduling, SGLang's overlap loop): step N
is resolved *after* step N + 1 has been launched, so the host schedules N + 1 and
post-processes N while the device runs. A decode input of N + 1 is a placeholder on the host;
its id is gathered on the device from step N's sampled-token tensor (`_feed_tokens`), never
copied through the host. The cost: a request that stops at step N was already scheduled in
N + 1; that extra token is discarded and its blocks are freed after it (stream order keeps
the freed blocks safe: any later step that reuses them runs after N + 1 on the device).
Length limits are known without the token, so a request never runs past max_tokens.

With speculative decoding (kit/speculative/) every step is synchronous: the drafts of step
N + 1 are proposed from step N's accepted tokens, and a verified step emits a list of tokens
per request, applied by `scheduler.update` (which rolls the rejected drafts' slots back).

`needs_synchronous_step` says which requests need their step resolved at once (host
state the next step needs: n > 1 siblings to fork, prompt logprobs, penalties and min_tokens
that read the newest token); such a step runs synchronously inside the overlapped loop.
On the CPU the device work is synchronous anyway, but the same code path runs (one step late).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kit.batch import ForwardBatch, SequenceInput
from kit.iteration_stats import StepTimes
from kit.output_processor import CompletionState, RequestState
from kit.request import RequestStatus
from kit.sampled_batch import SampledBatch, to_device
from kit.scheduler import PLACEHOLDER_TOKEN, SchedulerOutput

__all__ = ["InflightStep", "StepLoop", "needs_synchronous_step"]

# one sampling row: (scheduler request id, its state, the completion that samples, logits row)
_Row = tuple[str, RequestState, CompletionState, int]


def needs_synchronous_step(state: RequestState, comp: CompletionState) -> bool:
    """True if the step in which `comp` samples must be resolved before the next one is launched.

    The next step would need host state that only this step's token gives: the n > 1 siblings
    forked after completion 0's first token, prompt logprobs (read from the logits on the host),
    repetition/presence/frequency penalties (they count the newest token), min_tokens (the
    sampler masks stop ids by the number of tokens), and the logits hooks
    (kit/logits_processors.py: processors read the output ids, a guided-decoding matcher must
    take the token before the next mask, logprob ranks and generation logits read this step's
    logits, which the next step's forward overwrites). Beam requests are synchronous too
    (`StepLoop._launch`).
    """
    sp = comp.params
    # NOTE: penalties, logprobs, generation logits and logits hooks are read once, into `comp.sync_params`
    return (comp.sync_params or len(comp.token_ids) < sp.min_tokens
            or (sp.n > 1 and (len(state.completions) < sp.n or not all(c.forked for c in state.completions)))
            or (sp.prompt_logprobs is not None and state.prompt_logprobs is None))


@dataclass(eq=False)
class InflightStep:
    """A launched step: its schedule, sampling rows and the sampler's result still on the device."""

    out: SchedulerOutput
    picks: list[_Row]
    times: StepTimes
    sampled: SampledBatch | None = None  # None: no row sampled, or `results` are already on the host
    results: list[tuple[int, float, Any] | None] | None = None  # host results (per-row fallback)
    row_of: dict[str, int] = field(default_factory=dict)  # scheduler id -> its row in sampled.token_ids
    placeholders: dict[str, int] = field(default_factory=dict)  # from scheduler.advance
    sync: bool = True
    after: tuple | None = None  # (raw rows, rows the sampler saw, completions): LogitsPass.after_sample at resolve
    logits_rows: tuple | None = None  # (logits, rows): beam search / speculative verification read them at resolve


class StepLoop:
    """The step of `Executor` (see the module docstring); the executor holds the state it uses."""

    overlap: bool
    _pending: InflightStep | None
    _last_device_end: float | None

    def step(self) -> SchedulerOutput:
        """One iteration: schedule and launch a step; resolve the one before (overlap) or this one."""
        times = StepTimes(schedule=time.monotonic() - self._t0)
        if self.speculator is not None:  # NOTE: drafts need the last step's tokens: a synchronous loop
            self.speculator.propose(self.scheduler, self.output_processor.context_of)  # drafts -> the scheduler
        out = self.scheduler.schedule()
        times.prepare = time.monotonic() - self._t0
        self._report_rejected(out)
        launched = self._launch(out, times) if out.scheduled else None
        prev, self._pending = self._pending, None
        if prev is not None:
            self._resolve(prev)
        if launched is not None and self.speculator is not None:
            self._resolve(launched, update=True)
        elif launched is not None:
            launched.placeholders = self.scheduler.advance(out)
            if launched.sync or not self.overlap:
                self._resolve(launched)
            else:
                self._pending = launched
        return out

    def flush(self) -> None:
        """Resolve the step still in flight, if any (the loop calls it when nothing else is to schedule)."""
        prev, self._pending = self._pending, None
        if prev is not None:
            self._resolve(prev)

    # ------------------------------------------------------------------ launch
    def _launch(self, out: SchedulerOutput, times: StepTimes) -> InflightStep:
        batch, rows = self._build_batch(out)
        times.launch = time.monotonic() - self._t0
        times.forward_mark = self.clock.mark()
        logits = self.engine.forward(batch, self.kv_cache)  # (num logits rows, vocab)
        times.sampling_mark = self.clock.mark()
        picks = self._collect_rows(out, logits, rows)
        step = InflightStep(out, picks, times)
        self._sample(logits, step)
        times.end_mark = self.clock.mark()
        if step.sampled is not None:
            step.sampled.start_copy()
        times.launch_end = time.monotonic() - self._t0
        beams = self.beam_search.groups
        has_beams = bool(beams) and any(s.request_id in beams for s in out.scheduled)
        if has_beams or self.speculator is not None:
            step.logits_rows = (logits, rows)
        step.sync = (step.results is not None or has_beams
                     or any(needs_synchronous_step(p[1], p[2]) for p in picks))
        return step

    def _report_rejected(self, out: SchedulerOutput) -> None:
        for rid, reason in out.rejected:
            owner = self.output_processor.owner(rid)
            if owner is not None:
                self._fail(owner[0], ValueError(f"request {owner[0].greq.request_id!r} rejected: {reason}"))

    def _build_batch(self, out: SchedulerOutput) -> tuple[ForwardBatch, list[tuple[int, int, bool]]]:
        """The ForwardBatch and, per scheduled seq, (first logits row, rows, prompt-logprob rows?)."""
        op = self.output_processor
        if (not out.num_prefill_tokens and self.speculator is None and not self.beam_search.groups
                and not op.any_prompt_logits):
            # NOTE: a plain decode step (no chunk, draft, beam or prompt logits): one token and one logits row
            # per sequence, so nothing is decided per sequence; the batch comes straight from the schedule
            scheduled = out.scheduled
            batch = ForwardBatch.build_decode(scheduled, self.kv_cache_manager.block_size, device=self.engine.device)
            feeds = [(i, s.request_id) for i, s in enumerate(scheduled) if s.token_ids[0] == PLACEHOLDER_TOKEN]
            if feeds:
                self._feed_tokens(batch, feeds)
            return batch, [(i, 1, False) for i in range(len(scheduled))]
        seqs, rows, row = [], [], 0
        feeds: list[tuple[int, str]] = []  # (flat position, request id) of decode ids still on the device
        num_tokens = 0
        wants_prompt, beams = self.output_processor.wants_prompt_logits, self.beam_search.groups
        for s in out.scheduled:
            rid, ids = s.request_id, s.token_ids
            want_prompt = wants_prompt(rid, s.num_computed_tokens)
            # a speculating sequence needs a row per draft (kit/speculative/ verifies them)
            mode = "all" if want_prompt or s.num_draft_tokens else ("last" if s.is_last_chunk else "none")
            n = len(ids) if mode == "all" else int(mode == "last")
            seqs.append(SequenceInput(ids, s.num_computed_tokens, s.block_table, mode))
            if beams:  # beam search: the other beams' rows
                seqs.extend(extra := self.beam_search.extra_inputs(s))
                n += len(extra)
            rows.append((row, n, want_prompt))
            row += n
            num_tokens += len(ids)
            if ids[-1] == PLACEHOLDER_TOKEN:  # only the newest token can be still on the device
                feeds.append((num_tokens - 1, rid))
        batch = ForwardBatch.build(seqs, self.kv_cache_manager.block_size, device=self.engine.device)
        if feeds:
            self._feed_tokens(batch, feeds)
        return batch, rows

    def _feed_tokens(self, batch: ForwardBatch, feeds: list[tuple[int, str]]) -> None:
        """Scatter the step in flight's sampled tokens into `batch.input_ids`, on the device."""
        prev = self._pending
        if prev is None or prev.sampled is None or any(rid not in prev.row_of for _, rid in feeds):
            raise RuntimeError(f"placeholder tokens of {[rid for _, rid in feeds]} without a step in flight "
                               "that samples them")
        where = [pos for pos, _ in feeds]  # where each id goes in input_ids, and its row in the previous step's tokens
        rows = [prev.row_of[rid] for _, rid in feeds]
        n = len(feeds)
        if where == rows and where[-1] == n - 1:
            # NOTE: the steady decode case (the same sequences in the same order as the step before): one device
            # copy, no index list to send
            batch.input_ids[:n].copy_(prev.sampled.token_ids[:n])
            return
        index = to_device([where, rows], batch.input_ids.device)  # (2, num_feeds)
        batch.input_ids[index[0]] = prev.sampled.token_ids[index[1]]

    def _collect_rows(self, out: SchedulerOutput, logits: torch.Tensor,
                      rows: list[tuple[int, int, bool]]) -> list[_Row]:
        """Hand prompt-logprob rows to the output processor; list the rows to sample (n > 1 fan-out)."""
        picks: list[_Row] = []
        op = self.output_processor
        rows_of, beams = op.sampling_rows_of, self.beam_search.groups
        for s, (first, n, prompt_rows) in zip(out.scheduled, rows):
            if prompt_rows:  # logits of prompt positions 0..P-2 predict prompt tokens 1..P-1
                op.add_prompt_logits(s.request_id, logits[first:first + n - int(s.is_last_chunk)],
                                     logits[first + n - 1] if s.is_last_chunk else None)
            # beam rows: BeamSearch.advance; drafts: the speculator verifies them
            if s.is_last_chunk and not s.num_draft_tokens and s.request_id not in beams:
                rid = s.request_id
                state, comps = rows_of(rid)
                if len(comps) == 1:
                    picks.append((rid, state, comps[0], first + n - 1))
                else:
                    picks.extend((rid, state, c, first + n - 1) for c in comps)
        return picks

    def _sample(self, logits: torch.Tensor, step: InflightStep) -> None:
        """The sampler's pass over the step's rows (device); on a failure, find the rows at fault:
        their requests fail, the others get host results (and the step resolves at once)."""
        picks = step.picks
        if not picks:
            return
        idx = [p[3] for p in picks]
        # NOTE: through `to_device`: indexing a CUDA tensor with a Python list copies the list from pageable
        # memory, which waits for the device (a decode step's rows are 0..R-1 and need no gather at all)
        if idx == list(range(logits.shape[0])):
            sel = logits  # (len(picks), vocab)
        else:
            sel = logits.index_select(0, to_device(idx, logits.device))
        comps, raw = [p[2] for p in picks], sel
        # NOTE: logits hooks and after-sample work are among the params read into `sync_params`: a batch
        # without any skips both passes (one check per row instead of two passes of several)
        hooks = any(c.sync_params for c in comps)
        try:  # the logits hooks of the batch pass (kit/logits_processors.py), then the sampler
            sel = self.logits_pass.apply(raw, comps) if hooks else raw
            step.sampled = self.sampler.sample_async(sel, [c.context for c in comps], self.eos_token_ids)
            step.row_of = {rid: i for i, (rid, _, comp, _) in enumerate(picks) if comp.request_id == rid}
            if hooks and self.logits_pass.needs_after_sample(comps):
                step.after = (raw, sel, comps)
            return
        except Exception:  # noqa: BLE001
            pass
        results: list[tuple[int, float, Any] | None] = []
        for i, (_, state, comp, _) in enumerate(picks):
            try:
                one = self.logits_pass.apply(raw[i:i + 1], [comp])
                r = self.sampler.sample(one, [comp.context], self.eos_token_ids)
                self.logits_pass.after_sample(raw[i:i + 1], one, r.token_ids, [comp])
                results.append((r.token_ids[0], r.logprobs[0], r.top_logprobs[0]))
            except Exception as e:  # noqa: BLE001
                self._fail(state, e)
                results.append(None)
        step.results = results

    # ----------------------------------------------------------------- resolve
    def _resolve(self, step: InflightStep, update: bool = False) -> None:
        """The step's tokens reach the host: verdicts, scheduler commit (`update`: the synchronous
        scheduler.update of speculative steps), stats, publishing."""
        step.times.output = time.monotonic() - self._t0
        results = step.results
        if results is None:
            results = []
            if step.sampled is not None:
                r = step.sampled.result()  # waits for this step's copy only
                step.times.tokens = time.monotonic() - self._t0
                results = list(zip(r.token_ids, r.logprobs, r.top_logprobs))
                if step.after is not None:
                    results = self._after_sample(step, results)
        sampled, verdicts, touched = self._apply_tokens(step.picks, results)
        if update:  # speculative decoding: verify the drafts, several tokens per sequence
            for state, error in self.speculator.apply(step.out, *step.logits_rows, self.output_processor, sampled,
                                                      verdicts, touched):
                self._fail(state, error)
            ended = self.scheduler.update(step.out, sampled, verdicts)
        else:
            if step.logits_rows is not None:  # beam search (kit/beam_search.py): beam requests take their rows here
                self.beam_search.advance(step.out, *step.logits_rows, self.scheduler, self.output_processor, sampled,
                                         verdicts, touched)
            self.scheduler.commit(step.placeholders, sampled, verdicts)
            ended = self.scheduler.gone(step.placeholders)
        for rid in ended:  # ended by the scheduler's length guard, or by a verdict
            self.output_processor.end(rid, verdicts.get(rid, RequestStatus.FINISHED_LENGTH))
        # NOTE: record before publishing, so a caller woken by its result sees this iteration's stats;
        # the row's output time is completed after publishing
        step.times.output_end = time.monotonic() - self._t0
        row = self._record(step)
        self._output(touched)
        end = time.monotonic() - self._t0
        with self._lock:
            row.update(output_ms=1e3 * (end - step.times.output), cpu_output_end_s=end,
                       duration_ms=1e3 * (end - step.times.schedule))

    def _after_sample(self, step: InflightStep, results: list) -> list:
        """LogitsPass.after_sample on the step's rows (ranks, generation logits, guided matchers); a row
        whose hook fails fails its request alone."""
        raw, sel, comps = step.after
        try:
            self.logits_pass.after_sample(raw, sel, [r[0] for r in results], comps)
            return results
        except Exception:  # noqa: BLE001 - find the rows at fault
            out = []
            for i, ((_, state, comp, _), r) in enumerate(zip(step.picks, results)):
                try:
                    self.logits_pass.after_sample(raw[i:i + 1], sel[i:i + 1], [r[0]], [comp])
                    out.append(r)
                except Exception as e:  # noqa: BLE001
                    self._fail(state, e)
                    out.append(None)
            return out

    def _apply_tokens(self, picks: list[_Row], tokens: list[tuple[int, float, Any] | None]):
        """Give each sampled token to the output processor; collect the scheduler's tokens and verdicts."""
        sampled: dict[str, int] = {}
        verdicts: dict[str, RequestStatus] = {}
        touched: dict[str, RequestState] = {}
        op = self.output_processor
        live, failed = op.states, False
        for (rid, state, comp, _), tok in zip(picks, tokens):
            if tok is None or comp.finish_reason is not None or state.greq.request_id not in live:
                continue  # failed or aborted, or stopped a step ago (overlap: this token is discarded)
            try:
                verdict = op.add_token(state, comp, *tok)
            except Exception as e:  # noqa: BLE001 - e.g. the detokenizer: this request fails alone
                self._fail(state, e)
                failed = True
                continue
            touched[state.greq.request_id] = state
            if comp.index == 0 and len(comp.token_ids) == 1:  # its first token
                req = self.scheduler.get(rid)
                if req is not None:
                    state.num_cached_tokens = req.num_cached_tokens  # prefix-cache hit of its first admission
            if comp.request_id == rid:
                sampled[rid] = tok[0]
                if verdict is not None:
                    verdicts[rid] = verdict
        if failed:  # drop tokens of requests failed after their token was taken (n > 1 siblings)
            for rid in list(sampled):
                if op.owner(rid) is None:
                    del sampled[rid]
                    verdicts.pop(rid, None)
                    self.scheduler.finish(rid, RequestStatus.FINISHED_ERROR)
        return sampled, verdicts, touched

    def _output(self, touched: dict[str, RequestState]) -> None:
        for state in touched.values():
            if len(state.completions) == 1 and not state.greq.streaming and not state.finished:
                continue  # NOTE: nothing to fork or publish (a non-streaming request's only snapshot is its last)
            try:
                for comp, req in self.output_processor.children(state):  # n > 1: fork the siblings
                    parent = self.scheduler.get(state.completions[0].request_id)
                    try:
                        if parent is None:
                            self.scheduler.add_request(req)
                        else:
                            self.scheduler.fork(parent.request_id, req)
                    except ValueError as e:  # e.g. it can never fit the pool: this completion ends with the error
                        comp.finish_reason = "error"
                        state.error = str(e)
                self._publish(state)
            except Exception as e:  # noqa: BLE001 - creating this request's output failed: it alone fails
                self._fail(state, e)

    def _publish(self, state: RequestState, final: bool = False) -> None:
        # NOTE: forget a finishing request before its last snapshot wakes the caller, who may count in-flight ones
        # (the output processor forgets a request exactly when it is final or finished)
        if final or state.finished:
            self._forget(state.greq.request_id)
        self.output_processor.publish(state, final=final)

    def _record(self, step: InflightStep) -> dict[str, Any]:
        out, t = step.out, step.times
        self._iteration += 1
        timing = t.row(self.clock, self._last_device_end, not step.sync and self.overlap)
        self._last_device_end = timing["gpu_end_s"]
        row = {
            "iteration": self._iteration, "time_s": t.schedule, "duration_ms": 1e3 * (t.output_end - t.schedule),
            "request_ids": [s.request_id for s in out.scheduled],
            "num_prefill_tokens": out.num_prefill_tokens, "num_decode_tokens": out.num_decode_tokens,
            "batch_size": out.batch_size, "kv_blocks_used": out.kv_blocks_used,
            "kv_blocks_total": self.kv_cache_manager.num_blocks,
            "num_preemptions": len(out.preempted_request_ids),
            "preempted_request_ids": list(out.preempted_request_ids), "num_waiting": out.num_waiting,
            "num_draft_tokens": 0, "num_accepted_draft_tokens": 0,
            **(self.speculator.step_counts if self.speculator is not None else {}), **timing}
        snap = self.inspector.snapshot(step=self._iteration) if self.record_kv_cache else None
        with self._lock:
            self._stats.append(row)
            if snap is not None:
                self._kv_snapshots.append(snap)
        return row
