"""From sampled tokens to what a caller sees: text, stops, logprobs, snapshots.

The executor's loop hands every sampled token here, once. `OutputProcessor` owns, per
submitted request (`RequestState`) and per completion (`CompletionState`):

- the sampling context (params, token lists, the seeded generator): `contexts()`;
- incremental detokenization and stop strings, with streaming hold-back (a tail that
  could still grow into a stop string is not shown until it cannot);
- every stop decision, in `check_stop`, once per token, in this order:

      stop string (on the new text) -> stop token id -> eos (unless ignore_eos)
          -> length (max_tokens, or max_seq_len tokens in all)

  stop strings, stop token ids and eos count only once `min_tokens` outputs exist
  (the sampler also masks stop ids and eos before that). What a caller sees ends where
  TensorRT-LLM's output does: `token_ids` and `text` both without the eos token, and without
  the stop token / stop string unless `include_stop_str_in_output` (a stop string that starts
  inside a token keeps the text before it and drops that token);
- logprobs of generated tokens and prompt logprobs (rows gathered over prefill chunks);
- n > 1 fan-out: the siblings of completion 0 sample their first tokens from its logits
  row (`children()` hands their scheduler `Request`s to the executor to fork);
- snapshots: `RequestOutput`s published to each request's `GenerationResult`.

It never touches the scheduler or the engine: it answers with verdicts
(`RequestStatus` per scheduler request id) and the executor applies them.
"""

from __future__ import annotations

import dataclasses
import html
import time
from typing import Any

import torch

from kit.outputs import CompletionOutput, GenerationResult, Logprob, RequestOutput
from kit.request import GenerationRequest, Request, RequestStatus, length_finished
from kit.sampling import Sampler, SamplingContext, find_stop, prompt_logprobs
from kit.sampling_params import SamplingParams
from kit.speculative.stats import SpeculativeStats

__all__ = ["CompletionState", "OutputProcessor", "RequestState"]


class CompletionState:
    """One completion (one scheduler `Request`): its tokens, text, logprobs and how it ended."""

    def __init__(self, index: int, request_id: str, params: SamplingParams, prompt: list[int], detok: Any,
                 generator: torch.Generator | None) -> None:
        self.index = index
        self.request_id = request_id  # of its scheduler Request
        self.params = params
        self.detok = detok
        self.token_ids: list[int] = []
        self.context = SamplingContext(params, prompt, self.token_ids, generator)
        self.text = ""
        self.text_ends: list[int] = []  # len(text) after each token (where text and token_ids cut together)
        self.token_logprobs: list[float] = []
        self.num_kept: int | None = None  # tokens shown once finished (eos / stop token dropped), None: all
        self.emitted = 0  # characters of `text` already streamed
        self.emitted_tokens = 0  # entries of the shown token_ids already streamed
        self.prompt_sent = False  # exclude_input_from_output=False: the prompt went out in a diff
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.stop_reason: int | str | None = None
        self.finish_reason: str | None = None
        self.forked = index == 0  # siblings get a scheduler Request once their first token is known
        # NOTE: params that make every step synchronous (`needs_synchronous_step`), read once instead of per step
        self.sync_params = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                            or params.frequency_penalty != 0.0 or params.logprobs is not None
                            or params.return_generation_logits or bool(params.logits_processor)
                            or params.apply_batched_logits_processor or params.guided_decoding is not None)
        # the logits hooks' per-completion state (kit/logits_processors.py)
        self.matcher: Any = None  # guided decoding
        self.generation_logits: list[torch.Tensor] = []  # raw rows, with return_generation_logits
        self.last_rank: int | None = None  # rank of the newest token, with logprobs
        self._cumulative: float | None = None  # set by a beam search (kit/beam_search.py)
        self.num_forwards = 0  # target forwards that gave this completion tokens
        self.num_draft_tokens = 0  # speculative decoding: drafts verified, and accepted
        self.num_accepted_draft_tokens = 0

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the kept tokens' logprobs, or the score a beam search set (its hypothesis' sum)."""
        if self._cumulative is not None:
            return self._cumulative
        return float(sum(self.token_logprobs[:self.num_kept]))

    @cumulative_logprob.setter
    def cumulative_logprob(self, value: float) -> None:
        self._cumulative = float(value)


class RequestState:
    """One submitted `GenerationRequest`: its result, its completions, its prompt logprobs."""

    def __init__(self, greq: GenerationRequest, result: GenerationResult) -> None:
        self.greq = greq
        self.result = result
        self.completions: list[CompletionState] = []
        self.prompt_logprob_rows: list[torch.Tensor] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_logits_done = False
        self.context_logits: torch.Tensor | None = None  # (prompt_len, vocab), with return_context_logits
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0
        self.error: str | None = None
        self.beam_history: Any = None  # beam search: a kit.beam_search.BeamHistory once finished

    @property
    def finished(self) -> bool:
        comps, n = self.completions, self.greq.sampling_params.n
        if len(comps) == 1:  # NOTE: n == 1, the common case: read per request per step
            return n == 1 and comps[0].finish_reason is not None
        return len(comps) == n and all(c.finish_reason is not None for c in comps)


class OutputProcessor:
    """Per-request output state of the executor; see the module docstring."""

    def __init__(self, tokenizer: Any, eos_token_ids: tuple[int, ...], max_seq_len: int | None,
                 device: torch.device, *, speculative: bool = False) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_seq_len = max_seq_len
        self.device = device
        self.speculative = speculative  # an executor that speculates: outputs carry spec_stats
        self.states: dict[str, RequestState] = {}  # GenerationRequest id -> state
        self._owner: dict[str, tuple[RequestState, CompletionState]] = {}  # scheduler request id -> owner
        self._prompt_logits_ids: set[str] = set()  # requests that want prompt logits (prompt logprobs, context logits)

    # ---- requests and completions ------------------------------------------------------------
    def add(self, greq: GenerationRequest, result: GenerationResult) -> Request:
        """Register a request; return completion 0's scheduler `Request` (may raise for this request only)."""
        state = RequestState(greq, result)
        sp = greq.sampling_params
        comp = self._new_completion(state, 0, greq.request_id, sp.seed)
        req = Request(greq.request_id, list(greq.prompt_token_ids), sp.max_tokens, arrival_time=state.arrival,
                      use_prefix_cache=sp.prompt_logprobs is None and not sp.return_context_logits)
        self.states[greq.request_id] = state
        self._owner[req.request_id] = (state, comp)
        if sp.prompt_logprobs is not None or sp.return_context_logits:
            self._prompt_logits_ids.add(greq.request_id)
        return req

    def _new_completion(self, state: RequestState, index: int, rid: str, seed: int | None) -> CompletionState:
        sp = state.greq.sampling_params
        params = sp if seed == sp.seed else dataclasses.replace(sp, seed=seed)
        detok = (self.tokenizer.detokenizer(skip_special_tokens=sp.skip_special_tokens)
                 if self.tokenizer is not None and sp.detokenize else None)
        comp = CompletionState(index, rid, sp, list(state.greq.prompt_token_ids), detok,
                               Sampler.make_generator(params, self.device))
        state.completions.append(comp)
        return comp

    def owner(self, request_id: str) -> tuple[RequestState, CompletionState] | None:
        """(request state, completion) of a scheduler request id, or None once it is gone."""
        return self._owner.get(request_id)

    def context_of(self, request_id: str) -> SamplingContext | None:
        """The sampling context of a scheduler request id (None once it is gone)."""
        owner = self._owner.get(request_id)
        return None if owner is None else owner[1].context

    def pop(self, request_id: str) -> RequestState | None:
        """Forget a submitted request; return its state (None if unknown)."""
        state = self.states.pop(request_id, None)
        if state is not None:
            self._prompt_logits_ids.discard(request_id)
            for c in state.completions:
                self._owner.pop(c.request_id, None)
        return state

    def live_request_ids(self, state: RequestState) -> list[str]:
        """Scheduler ids of the state's completions that have not finished."""
        return [c.request_id for c in state.completions if c.finish_reason is None and c.forked]

    # ---- logits -> sampling rows -------------------------------------------------------------
    @property
    def any_prompt_logits(self) -> bool:  # a request in flight wants prompt logits (prompt logprobs, context logits)
        return bool(self._prompt_logits_ids)

    def wants_prompt_logits(self, request_id: str, num_computed_tokens: int) -> bool:
        if request_id not in self._prompt_logits_ids:  # NOTE: the common case, asked per sequence per step
            return False
        state, comp = self._owner[request_id]
        sp = state.greq.sampling_params
        want = ((sp.prompt_logprobs is not None or sp.return_context_logits) and comp.index == 0
                and not state.prompt_logits_done and num_computed_tokens < len(state.greq.prompt_token_ids))
        if want and num_computed_tokens == 0:
            state.prompt_logprob_rows = []  # (re)starting the prompt, e.g. after a preemption
        return want

    def add_prompt_logits(self, request_id: str, rows: torch.Tensor, last_row: torch.Tensor | None = None) -> None:
        """Logits of prompt positions (rows predict the next prompt token); completes at P - 1 rows.

        `last_row` (V,): the last prompt position's logits (given with the last chunk) ends the
        context logits."""
        state, _ = self._owner[request_id]
        state.prompt_logprob_rows.append(rows.float().cpu().clone())
        prompt = list(state.greq.prompt_token_ids)
        sp = state.greq.sampling_params
        if sum(r.shape[0] for r in state.prompt_logprob_rows) == len(prompt) - 1:
            cat = torch.cat(state.prompt_logprob_rows)  # (P - 1, V)
            if sp.prompt_logprobs is not None:
                state.prompt_logprobs = prompt_logprobs(cat, prompt, sp.prompt_logprobs)
            if sp.return_context_logits and last_row is not None:
                state.context_logits = torch.cat([cat, last_row.float().cpu().reshape(1, -1)])  # (P, V)
            state.prompt_logprob_rows = []
            state.prompt_logits_done = True

    def sampling_rows(self, request_id: str) -> list[CompletionState]:
        """Completions sampling from this request's row: itself (+ its n > 1 siblings at completion 0's first)."""
        return self.sampling_rows_of(request_id)[1]

    def sampling_rows_of(self, request_id: str) -> tuple[RequestState, list[CompletionState]]:
        """(its request state, `sampling_rows(request_id)`), with one lookup."""
        state, comp = self._owner[request_id]
        if comp.index == 0 and len(state.completions) == 1 and state.greq.sampling_params.n > 1:
            sp = state.greq.sampling_params
            for i in range(1, sp.n):
                self._new_completion(state, i, f"{state.greq.request_id}#{i}",
                                     None if sp.seed is None else sp.seed + i)
            return state, list(state.completions)
        return state, [comp]

    # ---- tokens -> verdicts ------------------------------------------------------------------
    def add_token(self, state: RequestState, comp: CompletionState, token: int, logprob: float,
                  top: dict[int, float] | None) -> RequestStatus | None:
        """Record one sampled token of `comp`; return its stop verdict (None: it goes on)."""
        comp.num_forwards += 1
        return self._add(state, comp, token, logprob, top)

    def add_tokens(self, state: RequestState, comp: CompletionState, tokens: list[tuple[int, float, Any]],
                   num_draft_tokens: int, num_accepted: int) -> tuple[int, RequestStatus | None]:
        """Speculative decoding: the tokens one target forward gave `comp` (accepted drafts, then the
        target's own), each through the stop checks in order, as if decoded one by one; the first
        verdict drops the rest. Returns (tokens taken, verdict)."""
        comp.num_forwards += 1
        comp.num_draft_tokens += num_draft_tokens
        comp.num_accepted_draft_tokens += num_accepted
        for i, (token, logprob, top) in enumerate(tokens):
            verdict = self._add(state, comp, token, logprob, top)
            if verdict is not None:
                return i + 1, verdict
        return len(tokens), None

    def _add(self, state: RequestState, comp: CompletionState, token: int, logprob: float,
             top: dict[int, float] | None) -> RequestStatus | None:
        comp.token_ids.append(token)
        comp.token_logprobs.append(logprob)
        if comp.logprobs is not None:
            # top-k ids in order (rank 1, 2, ...), then the sampled token with its own rank if not among them
            items = list((top or {}).items())[:comp.params.logprobs]
            entries = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(items, start=1)}
            if token not in entries:
                entries[token] = Logprob(logprob, comp.last_rank)
            comp.logprobs.append(entries)
        state.first_token_time = state.first_token_time or time.monotonic()
        return self.check_stop(state, comp, token)

    def check_stop(self, state: RequestState, comp: CompletionState, token: int) -> RequestStatus | None:
        """Every stop decision, for the newest token of `comp` (see the module docstring)."""
        sp = comp.params
        n_out = len(comp.token_ids)
        early = n_out < sp.min_tokens
        start = len(comp.text)
        if comp.detok is not None:
            comp.text += comp.detok.add(token)
        comp.text_ends.append(len(comp.text))
        if comp.detok is not None:
            cut = None if early or not sp.stop else find_stop(comp.text, start, sp.stop, sp.include_stop_str_in_output)
            if cut is not None:
                inc = sp.include_stop_str_in_output
                matched = [s for s in sp.stop
                           if (comp.text[cut - len(s):cut] if inc else comp.text[cut:cut + len(s)]) == s]
                comp.stop_reason = matched[0] if matched else None
                comp.text = comp.text[:cut]
                # the tokens whose text lies before the cut (inc: up to the token that completes the stop string)
                kept = sum(e <= cut for e in comp.text_ends) if not inc else \
                    next(i + 1 for i, e in enumerate(comp.text_ends) if e >= cut)
                comp.num_kept = kept
                return self._end(comp, "stop")
        if not early and token in sp.stop_token_ids:
            comp.stop_reason = token
            if not sp.include_stop_str_in_output:
                self._drop_last(comp)
            return self._end(comp, "stop")
        eos = self.eos_token_ids if sp.end_id is None else (sp.end_id,)
        if not early and token in eos and not sp.ignore_eos:
            self._drop_last(comp)  # TensorRT-LLM: the end token is not part of the output
            return self._end(comp, "stop")
        if length_finished(n_out, sp.max_tokens, len(state.greq.prompt_token_ids) + n_out, self.max_seq_len):
            return self._end(comp, "length")
        return None

    @staticmethod
    def _drop_last(comp: CompletionState) -> None:
        """Show the completion without its newest token (and that token's text)."""
        comp.num_kept = len(comp.token_ids) - 1
        comp.text = comp.text[:comp.text_ends[-2] if len(comp.text_ends) > 1 else 0]

    @staticmethod
    def _end(comp: CompletionState, reason: str) -> RequestStatus:
        comp.finish_reason = reason
        if reason != "stop" and comp.detok is not None:
            comp.text += comp.detok.flush()
        return RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH

    def children(self, state: RequestState) -> list[tuple[CompletionState, Request]]:
        """Scheduler Requests for siblings that have their first token and are still running."""
        out = []
        for c in state.completions[1:]:
            if c.forked:
                continue
            c.forked = True
            if c.finish_reason is None:
                req = Request(c.request_id, list(state.greq.prompt_token_ids), state.greq.sampling_params.max_tokens,
                              arrival_time=state.arrival, output_token_ids=list(c.token_ids))
                self._owner[c.request_id] = (state, c)
                out.append((c, req))
        return out

    def end(self, request_id: str, status: RequestStatus) -> None:
        """The scheduler ended this completion (abort, error, rejection, length guard)."""
        owner = self._owner.get(request_id)
        if owner is not None and owner[1].finish_reason is None:
            self._end(owner[1], status.finish_reason or "cancelled")

    # ---- snapshots ---------------------------------------------------------------------------
    def publish(self, state: RequestState, final: bool = False) -> None:
        """Send a snapshot (streaming) or the final output; forget the request once finished.

        `final=True` ends it even with completions still unborn (an abort before the first token)."""
        final = final or state.finished
        if final:
            self.pop(state.greq.request_id)
        elif not state.greq.streaming:
            return
        outputs = [self._completion_output(state, c) for c in state.completions]
        metrics = {"arrival_time": state.arrival, "first_token_time": state.first_token_time,
                   "finished_time": time.monotonic() if final else None,
                   "num_cached_tokens": state.num_cached_tokens}
        if state.beam_history is not None:  # beam search (kit/beam_search.py): parent pointers of every step
            metrics["beam_history"] = state.beam_history
        state.result.publish(RequestOutput(state.greq.request_id, state.greq.prompt, list(state.greq.prompt_token_ids),
                                           outputs, final, state.prompt_logprobs, metrics, error=state.error,
                                           context_logits=state.context_logits))

    def _completion_output(self, state: RequestState, c: CompletionState) -> CompletionOutput:
        """What a caller sees of `c` now: text and token ids cut together, and what was added since."""
        sp = state.greq.sampling_params
        if c.finish_reason is not None:
            visible, n = c.text, len(c.token_ids) if c.num_kept is None else c.num_kept
        else:
            # hold back a tail that could still become a stop string while streaming (and its tokens)
            hold = 0 if not sp.stop else max(map(len, sp.stop)) - 1
            visible = c.text[:max(c.emitted, len(c.text) - hold)]
            n = sum(e <= len(visible) for e in c.text_ends)
        n = max(n, c.emitted_tokens)
        token_ids = c.token_ids[:n]
        logprobs = c.logprobs[:n] if c.logprobs is not None else None
        text_diff, ids_diff = visible[c.emitted:], token_ids[c.emitted_tokens:]
        lp_diff = logprobs[c.emitted_tokens:] if logprobs is not None else []
        gen_logits = torch.stack(c.generation_logits[:n]) if c.generation_logits else None  # (n, V)
        c.emitted, c.emitted_tokens = len(visible), n
        if not sp.exclude_input_from_output:  # the prompt leads token_ids and text
            prompt_text = state.greq.prompt if state.greq.prompt is not None else (
                self.tokenizer.decode(state.greq.prompt_token_ids) if self.tokenizer is not None and sp.detokenize
                else "")
            first, c.prompt_sent = not c.prompt_sent, True
            token_ids = list(state.greq.prompt_token_ids) + token_ids
            ids_diff = (list(state.greq.prompt_token_ids) if first else []) + ids_diff
            visible, text_diff = prompt_text + visible, (prompt_text if first else "") + text_diff
        spec = SpeculativeStats(c.num_draft_tokens, c.num_accepted_draft_tokens, c.num_forwards,
                                len(c.token_ids)) if self.speculative else None
        return CompletionOutput(c.index, visible, token_ids, c.finish_reason, c.cumulative_logprob,
                                list(logprobs) if logprobs is not None else None, c.stop_reason,
                                text_diff=text_diff, token_ids_diff=ids_diff, generation_logits=gen_logits,
                                logprobs_diff=list(lp_diff), spec_stats=spec)

    def fail(self, state: RequestState, error: BaseException) -> None:
        """End the request with `error` (raised by its result); forget it."""
        self.pop(state.greq.request_id)
        for c in state.completions:
            c.finish_reason = c.finish_reason or "error"
        state.result.publish(None, error)

    def __repr__(self) -> str:
        return f"OutputProcessor({len(self.states)} requests in flight, eos={self.eos_token_ids})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(rid)}</td><td>{len(s.completions)}/{s.greq.sampling_params.n}</td>"
            f"<td>{[len(c.token_ids) for c in s.completions]}</td>"
            f"<td>{html.escape(repr(s.completions[0].text[-40:]) if s.completions else '')}</td></tr>"
            for rid, s in list(self.states.items())[:20])
        return (f"<b>OutputProcessor</b> &middot; {len(self.states)} requests in flight<table><tr><th>request</th>"
                f"<th>completions</th><th>tokens</th><th>text (tail)</th></tr>{rows}</table>")
