"""Beam search: one request decodes `beam_width` sequences together and returns the best `n`.

Each step, every running beam's logits row becomes log-probabilities; added to the beam's
running sum, they give `beam_width x vocab` candidates, of which the best
`K = max(2, 1 + num_end_ids) * beam_width` are kept (K > beam_width, so that enough
candidates remain when some end):

    candidates (sorted)  ->  ended (end token, or max_tokens reached) and among the first
                             beam_width: a finished hypothesis, score = sum / len ** length_penalty
                         ->  the best beam_width that did not end: next step's beams; each
                             names its parent beam, whose KV it continues (kit/kv_fork.py)

The search stops when every candidate ended (max_tokens), when `early_stopping` is True and
beam_width hypotheses have finished, or when no running beam can beat the worst of
beam_width finished hypotheses (the estimate uses the current length, or, for
`early_stopping="never"` with a positive length penalty, the longest possible length).
These are the semantics of Hugging Face's `generate(num_beams=..., do_sample=False)`
(`_beam_search`), which TensorRT-LLM's beam search also follows; the outputs are the best
`n` finished hypotheses, sorted by score, each with its `cumulative_logprob` (the raw sum).

In the executor (`BeamSearch`): the scheduler sees one request (the *leader*, beam 0) whose
token and block budgets count every beam (`beam_tokens`, `beam_extra_blocks`); its prompt is
prefilled once (in chunks if need be); after its last chunk the beams are forked, sharing the
prompt's blocks. Each step adds the other beams' rows to the batch (`extra_inputs`), takes all
the rows of the request (`advance`), re-maps the block tables to the parents, and hands the
leader's new token to the scheduler. A beam request is decided whole within one step.
`BeamHistory` records the parent pointers of every step (widgets/beam_tree.py draws them).
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch

from kit.batch import KVCache, SequenceInput
from kit.kv_cache import KVCacheManager
from kit.kv_fork import fork_tables
from kit.output_processor import CompletionState, RequestState
from kit.request import GenerationRequest, Request, RequestStatus, beam_extra_blocks, beam_tokens
from kit.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from kit.scheduler_output import SchedulerPolicy

__all__ = ["BeamHistory", "BeamSearch", "BeamState", "Hypothesis", "beam_extra_blocks", "beam_tokens",
           "check_beam_request", "HISTORY_COLUMNS"]

_NEG = -1.0e9  # Hugging Face's "never pick this" score; kept so that float arithmetic matches it
HISTORY_COLUMNS = ("step", "beam", "parent", "token", "text", "cumulative_logprob", "score", "kind", "rank")


# ---------------------------------------------------------------- validation
def check_beam_request(request: GenerationRequest, max_beam_width: int, policy: SchedulerPolicy) -> None:
    """Raise ValueError naming the field if this beam request cannot run here (no-op for other requests)."""
    sp = request.sampling_params
    if not sp.use_beam_search:
        return
    w = sp.beam_width
    if w > max_beam_width:
        raise ValueError(f"beam width {w} (SamplingParams.best_of={sp.best_of}, n={sp.n}) exceeds this engine's "
                         f"BuildConfig.max_beam_width={max_beam_width}: build with max_beam_width >= {w}")
    why = ("the kit's beam search ranks beams by the model's raw log-probabilities (Hugging Face "
           "generate(num_beams=..., do_sample=False)); TensorRT-LLM applies temperature and penalties to the "
           "logits before its beam search, which the kit does not")
    t = sp.temperature
    if not (t is None or t < GREEDY_TEMPERATURE or t == 1.0):
        raise ValueError(f"SamplingParams.temperature={t} with use_beam_search=True: {why}; leave it unset, 0 or 1")
    for name, off in (("top_k", (None, 0, -1)), ("top_p", (None, 1.0)), ("min_p", (None, 0.0)),
                      ("repetition_penalty", (None, 1.0)), ("presence_penalty", (None, 0.0)),
                      ("frequency_penalty", (None, 0.0)), ("logprobs", (None,)), ("prompt_logprobs", (None,))):
        if getattr(sp, name, None) not in off:
            raise ValueError(f"SamplingParams.{name}={getattr(sp, name)!r} cannot be combined with use_beam_search=True "
                             f"(allowed: {' or '.join(map(repr, off))}): {why}")
    if sp.stop:
        raise ValueError(f"SamplingParams.stop={sp.stop!r} cannot be combined with use_beam_search=True: beams end "
                         "on end tokens only (eos, stop_token_ids)")
    if request.streaming:
        raise ValueError("streaming=True cannot be combined with use_beam_search=True: beams are re-ranked every "
                         "step, so a beam request returns its outputs once, when it finishes")
    if policy is not SchedulerPolicy.GUARANTEED_NO_EVICT:
        raise ValueError(f"use_beam_search=True needs the guaranteed_no_evict scheduler policy (got {policy.value}): "
                         "a preempted beam request would lose its beams")


# ---------------------------------------------------------------- the search
@dataclass
class Hypothesis:
    """A finished beam: its generated tokens, length-penalised score and raw log-probability sum."""

    tokens: list[int]
    score: float
    cumulative_logprob: float
    row: int  # its row in the history


@dataclass
class BeamHistory:
    """Parent pointers of a finished search, one row per beam per step (see `HISTORY_COLUMNS`).

    `kind` is "running" (a beam continued to the next step; `beam` is its slot) or "finished"
    (a hypothesis that ended at that step; `beam` is -1, `score` its length-penalised score).
    `parent` is the beam slot at step - 1 it continues (-1: the prompt). `rank` is the output
    index of a returned hypothesis, else -1.
    """

    beam_width: int
    length_penalty: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(HISTORY_COLUMNS))

    def path(self, rank: int) -> list[int]:
        """Row indices from the first token to the returned hypothesis `rank` (its chain of parents)."""
        end = next((i for i, r in enumerate(self.rows) if r["rank"] == rank), None)
        if end is None:
            raise KeyError(f"no returned hypothesis of rank {rank}")
        by_slot = {(r["step"], r["beam"]): i for i, r in enumerate(self.rows) if r["kind"] == "running"}
        chain, r = [end], self.rows[end]
        while r["parent"] >= 0:
            i = by_slot[(r["step"] - 1, r["parent"])]
            chain.append(i)
            r = self.rows[i]
        return chain[::-1]

    def _repr_html_(self) -> str:
        f = self.frame()
        head = (f"<b>BeamHistory</b> &middot; beam width {self.beam_width}, length penalty {self.length_penalty} &middot; "
                f"{int(f['step'].max()) if len(f) else 0} steps, {int((f['kind'] == 'finished').sum())} finished")
        return head + f.loc[f["rank"] >= 0].to_html(index=False, border=0)


class BeamState:
    """The search of one request, on logits rows: `step(logits)` once per generated position."""

    def __init__(self, params: SamplingParams, end_ids: Sequence[int], decode: Any = None) -> None:
        self.beam_width = params.beam_width
        self.num_return = params.n
        self.max_tokens = params.max_tokens
        self.min_tokens = params.min_tokens
        self.end_ids = tuple(dict.fromkeys(end_ids))
        self.length_penalty = 0.0 if params.length_penalty is None else params.length_penalty  # TensorRT-LLM's
        self.early_stopping = True if params.early_stopping is None else params.early_stopping  # default: 1
        self.num_candidates = max(2, 1 + len(self.end_ids)) * self.beam_width
        self.scores = torch.zeros(1)  # (num running beams,) raw log-probability sums, float32
        self.tokens: list[list[int]] = [[]]  # generated tokens of each running beam
        self.finished: list[Hypothesis] = []  # the best beam_width, best first
        self.improvable = True  # Hugging Face's is_early_stop_heuristic_unsatisfied
        self.done = False
        self.decode = decode or str
        self.history = BeamHistory(self.beam_width, self.length_penalty)

    @property
    def num_generated(self) -> int:
        return len(self.tokens[0])

    def step(self, logits: torch.Tensor) -> list[int]:
        """Advance by one token; `logits` is (num running beams, vocab). Returns the parent of each new beam."""
        if self.done:
            raise RuntimeError("step: this beam search is already finished")
        if logits.dim() != 2 or logits.shape[0] != len(self.tokens):
            raise ValueError(f"step: logits must be ({len(self.tokens)} beams, vocab), got {tuple(logits.shape)}")
        w, t = self.beam_width, self.num_generated
        logprobs = torch.log_softmax(logits.float().cpu(), dim=-1)  # (R, V)
        if t < self.min_tokens and self.end_ids:
            logprobs[:, list(self.end_ids)] = -math.inf
        vocab = logprobs.shape[1]
        acc = (logprobs + self.scores[:, None]).reshape(-1)  # (R * V,): beam-major, as Hugging Face flattens
        k = min(self.num_candidates, acc.numel())
        vals, idx = acc.topk(k)  # (K,) best first
        parents, toks = (idx // vocab).tolist(), (idx % vocab).tolist()
        ends = torch.tensor([tok in self.end_ids or t + 1 >= self.max_tokens for tok in toks])  # (K,)
        # the next running beams: the best w candidates that did not end
        running = vals + ends.float() * _NEG
        keep = running.topk(min(w, k)).indices.tolist()
        # finished hypotheses: candidates among the first w that ended, while they can still enter
        full = len(self.finished) == w and self.early_stopping is True
        if self.improvable and not full:
            scores = vals / ((t + 1) ** self.length_penalty)
            for j in range(min(w, k)):
                if ends[j]:
                    self._record(t + 1, -1, parents[j], toks[j], float(vals[j]), float(scores[j]))
                    self.finished.append(Hypothesis(self.tokens[parents[j]] + [toks[j]], float(scores[j]),
                                                    float(vals[j]), len(self.history.rows) - 1))
            self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses first on a tie
            del self.finished[w:]
        new_parents = [parents[j] for j in keep]
        self.tokens = [self.tokens[parents[j]] + [toks[j]] for j in keep]
        self.scores = running[keep]
        for slot, j in enumerate(keep):
            self._record(t + 1, slot, parents[j], toks[j], float(running[j]), None)
        # can a running beam still beat the worst finished one?
        if len(self.finished) == w:
            length = self.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else t + 1
            best = self.scores[:1] / (length ** self.length_penalty)
            worst = torch.tensor([h.score for h in self.finished]).min()
            self.improvable = self.improvable and bool((best > worst).item())
        self.done = (not self.improvable or (len(self.finished) == w and self.early_stopping is True)
                     or bool(ends.all()))
        if self.done:
            for rank, h in enumerate(self.outputs()):
                self.history.rows[h.row]["rank"] = rank
        return new_parents

    def outputs(self) -> list[Hypothesis]:
        """The best `n` finished hypotheses, best first."""
        return self.finished[:self.num_return]

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{i}</td><td>{float(sc):.4f}</td><td>{html.escape(str(toks[-8:]))}</td></tr>"
                       for i, (sc, toks) in enumerate(zip(self.scores.tolist(), self.tokens)))
        fin = "".join(f"<tr><td>{h.score:.4f}</td><td>{h.cumulative_logprob:.4f}</td><td>{len(h.tokens)}</td></tr>"
                      for h in self.finished)
        return (f"<b>BeamState</b> &middot; width {self.beam_width}, step {self.num_generated}/{self.max_tokens}, "
                f"{'done' if self.done else 'running'} &middot; length_penalty {self.length_penalty}, early_stopping "
                f"{self.early_stopping!r}<table><tr><th>beam</th><th>logprob sum</th><th>last tokens</th></tr>{rows}"
                f"</table><table><tr><th>finished score</th><th>logprob sum</th><th>tokens</th></tr>{fin}</table>")

    def _record(self, step: int, beam: int, parent: int, token: int, cum: float, score: float | None) -> None:
        self.history.rows.append({"step": step, "beam": beam, "parent": parent if step > 1 else -1, "token": token,
                                  "text": self.decode(token), "cumulative_logprob": cum, "score": score,
                                  "kind": "running" if beam >= 0 else "finished", "rank": -1})


# ---------------------------------------------------------------- in the executor
@dataclass
class _Group:
    state: BeamState
    greq: GenerationRequest
    shadows: list[Request] = field(default_factory=list)  # beams 1.. (beam 0 is the scheduler's request)


class BeamSearch:
    """The executor's beam requests: their extra batch rows, their step, their KV re-mapping."""

    def __init__(self, kv_cache_manager: KVCacheManager, kv_cache: KVCache | None, eos_token_ids: Sequence[int],
                 tokenizer: Any = None) -> None:
        self.kv = kv_cache_manager
        self.kv_cache = kv_cache
        self.eos_token_ids = tuple(eos_token_ids)
        self.tokenizer = tokenizer
        self.groups: dict[str, _Group] = {}

    def owns(self, request_id: str) -> bool:
        return request_id in self.groups

    def add(self, greq: GenerationRequest, request: Request) -> Request:
        """Register a beam request (others pass through); its scheduler `request` budgets for every beam."""
        sp = greq.sampling_params
        if not sp.use_beam_search:
            return request
        end_ids = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else self.eos_token_ids)
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else str
        request.beam_width = sp.beam_width
        self.groups[request.request_id] = _Group(BeamState(sp, end_ids, decode), greq)
        return request

    def extra_inputs(self, seq: Any) -> list[SequenceInput]:
        """The other beams' rows for a scheduled leader `seq` (a ScheduledSequence); allocates their slots."""
        group = self.groups.get(seq.request_id)
        if group is None or not group.shadows:
            return []
        inputs = []
        for shadow in group.shadows:
            shadow.num_computed_tokens = seq.num_computed_tokens
            if self.kv.allocate_slots(shadow, len(seq.token_ids)) is None:
                raise RuntimeError(f"beam {shadow.request_id!r}: no KV block although its budget was reserved")
            start = seq.num_computed_tokens
            inputs.append(SequenceInput(shadow.token_ids_between(start, start + len(seq.token_ids)), start,
                                        self.kv.block_table(shadow.request_id), "last"))
        return inputs

    def advance(self, out: Any, logits: torch.Tensor, rows: Sequence[tuple[int, int, bool]], scheduler: Any,
                output_processor: Any, sampled: dict, verdicts: dict, touched: dict) -> None:
        """One beam step for every beam request that computed its last token this step.

        Re-maps the beams' blocks and token lists, and puts the leader's token (and verdict, once
        the search is over) into `sampled` / `verdicts` for the scheduler's update."""
        for seq, (first, n, _) in zip(out.scheduled, rows):
            group = self.groups.get(seq.request_id)
            owner = output_processor.owner(seq.request_id)
            leader = scheduler.get(seq.request_id)
            if group is None or not seq.is_last_chunk or owner is None:
                continue
            state: RequestState = owner[0]
            beams = group.state
            first_step = beams.num_generated == 0
            parents = beams.step(logits[first:first + n])  # (R, vocab) rows: beam 0 first
            rid = seq.request_id
            touched[rid] = state
            if first_step:
                state.first_token_time = state.first_token_time or time.monotonic()
                state.num_cached_tokens = leader.num_cached_tokens if leader is not None else 0
            if beams.done:
                self._finish(rid, state, sampled, verdicts)
                continue
            if leader is None:  # ended since its step was launched (the scheduler's length guard): over
                self.release(rid)
                continue
            num_tokens = seq.num_computed_tokens + len(seq.token_ids)
            src = [rid] + [s.request_id for s in group.shadows]
            dst = [rid] + [f"{rid}#beam{i}" for i in range(1, len(parents))]
            fork_tables(self.kv, self.kv_cache, src, dst, parents, num_tokens)
            if first_step:
                group.shadows = [Request(d, list(leader.prompt_token_ids), leader.max_tokens,
                                         num_computed_tokens=num_tokens, status=RequestStatus.RUNNING)
                                 for d in dst[1:]]
            for shadow, tokens in zip(group.shadows, beams.tokens[1:]):
                shadow.output_token_ids = list(tokens)
            # NOTE: the scheduler's `advance` put a placeholder where the newest token goes; `commit`
            # writes `sampled` there, the same token
            leader.output_token_ids = list(beams.tokens[0])
            sampled[rid] = beams.tokens[0][-1]

    def _finish(self, rid: str, state: RequestState, sampled: dict, verdicts: dict) -> None:
        """The search is over: the best n hypotheses become the request's completions; beams are freed."""
        group = self.groups.pop(rid)
        for shadow in group.shadows:
            self.kv.free(shadow.request_id)
        sp, prompt = group.greq.sampling_params, list(group.greq.prompt_token_ids)
        comps = []
        for rank, hyp in enumerate(group.state.outputs()):
            detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
            comp = CompletionState(rank, rid if rank == 0 else f"{rid}#{rank}", sp, prompt, detok, None)
            comp.token_ids.extend(hyp.tokens)  # in place: the sampling context holds this list
            ended = hyp.tokens[-1] in group.state.end_ids
            comp.finish_reason = "stop" if ended else "length"
            comp.stop_reason = hyp.tokens[-1] if ended and hyp.tokens[-1] in sp.stop_token_ids else None
            # NOTE: as for every request (TensorRT-LLM's rule), the end token is not part of the output:
            # token_ids and text stop before it (a stop token id stays with include_stop_str_in_output)
            keep_end = ended and comp.stop_reason is not None and sp.include_stop_str_in_output
            kept = hyp.tokens if not ended or keep_end else hyp.tokens[:-1]
            comp.num_kept = len(kept)
            if detok is not None:
                comp.text = "".join(detok.add(tok) for tok in kept) + detok.flush()
            comp.cumulative_logprob = hyp.cumulative_logprob
            comp.forked = True
            comps.append(comp)
        state.completions[:] = comps
        state.beam_history = group.state.history
        best = comps[0]
        sampled[rid] = best.token_ids[-1]
        verdicts[rid] = RequestStatus.FINISHED_STOPPED if best.finish_reason == "stop" else RequestStatus.FINISHED_LENGTH

    def release(self, request_id: str) -> None:
        """Forget a beam request that ended otherwise (abort, error): free its other beams' blocks."""
        group = self.groups.pop(request_id, None)
        for shadow in group.shadows if group is not None else ():
            self.kv.free(shadow.request_id)

    def __repr__(self) -> str:
        return f"BeamSearch({len(self.groups)} beam requests in flight)"

    def _repr_html_(self) -> str:
        return f"<b>BeamSearch</b> &middot; {len(self.groups)} beam requests in flight" + "".join(
            g.state._repr_html_() for g in list(self.groups.values())[:4])
