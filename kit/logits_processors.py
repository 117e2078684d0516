"""Logits processors and the guided-decoding mask: the hooks of the sampler's batch pass.

Before the `Sampler` turns a batch of logits rows into tokens, `LogitsPass.apply` lets
callers change those rows, in this order (TensorRT-LLM's semantics and call signatures):

    raw logits (R, V) ──► per-request processors ──► the batched processor ──► guided bitmask ──► Sampler
     (copied once when      SamplingParams.logits_processor   LLM(batched_logits_processor=)   xgrammar, on
      any row changes)      (req_id, logits, token_ids,       (req_ids, [logits], [token_ids],  the logits'
                             stream_ptr, client_id)            stream_ptr, client_ids)           device

- A processor changes `logits` *in place*; it sees the row as a (1, beam_width=1, V) view and
  `token_ids` as `[prompt + output so far]` (one list per beam). `req_id` is the request's id
  (a str in the kit). `stream_ptr` is the current CUDA stream (None on the CPU).
- The batched processor runs once per batch over every row whose request set
  `apply_batched_logits_processor=True`.
- `return_generation_logits` keeps each row as it came from the model (before any hook).

After sampling, `after_sample` advances the guided matchers by the sampled tokens and
records the rank of each sampled token (for `Logprob.rank`) in the logits the sampler saw,
and keeps the raw rows of requests that asked for `return_generation_logits`.
"""

from __future__ import annotations

from typing import Any

import torch

from kit.guided_decoding import GuidedDecoder
from kit.sampling_params import BatchedLogitsProcessor, LogitsProcessor, SamplingParams

__all__ = ["LogitsProcessor", "BatchedLogitsProcessor", "LogitsPass"]


def _stream_ptr(device: torch.device) -> int | None:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


class LogitsPass:
    """The hooks run on a batch of logits rows; one per executor. See the module docstring.

    The completions handed in are the output processor's `CompletionState`s: this reads their
    `params`, `request_id` and `context` (token lists) and keeps per completion its guided matcher
    (`matcher`), its raw logits rows (`generation_logits`) and the rank of its newest token (`last_rank`).
    """

    def __init__(self, batched_logits_processor: Any = None, guided_decoder: GuidedDecoder | None = None) -> None:
        if batched_logits_processor is not None and not callable(batched_logits_processor):
            raise TypeError(f"batched_logits_processor must be None or a callable (req_ids, logits, token_ids, "
                            f"stream_ptr, client_ids), got {type(batched_logits_processor).__name__}")
        self.batched_logits_processor = batched_logits_processor
        self.guided_decoder = guided_decoder

    def validate(self, params: SamplingParams) -> None:
        """Refuse, at submit, a request that asks for a hook this pass does not have."""
        if params.apply_batched_logits_processor and self.batched_logits_processor is None:
            raise ValueError("SamplingParams.apply_batched_logits_processor=True needs "
                             "LLM(batched_logits_processor=...), and this LLM has none")
        if params.guided_decoding is not None:
            if self.guided_decoder is None:
                raise ValueError("SamplingParams.guided_decoding needs LLM(guided_decoding_backend='xgrammar'), "
                                 "and this LLM has no guided-decoding backend")
            self.guided_decoder.compile(params.guided_decoding)  # a bad guide fails here, at submit

    def apply(self, logits: torch.Tensor, comps: list[Any]) -> torch.Tensor:
        """The rows (R, V) the sampler should see: `logits` itself when no hook applies, else a copy."""
        wants = [c.params for c in comps]
        if not any(p.logits_processor or p.apply_batched_logits_processor or p.guided_decoding is not None
                   for p in wants):
            return logits
        logits = logits.clone()  # NOTE: the engine's buffer may back other rows (prompt logits) still in use
        vocab = logits.shape[1]
        stream = _stream_ptr(logits.device)
        batched: list[int] = []
        for i, c in enumerate(comps):
            p = c.params
            if p.logits_processor:
                ids = [c.context.prompt_token_ids + c.context.output_token_ids]
                for proc in p.logits_processor:
                    proc(c.request_id, logits[i].view(1, 1, vocab), ids, stream, None)
            if p.apply_batched_logits_processor:
                batched.append(i)
        if batched:
            self.batched_logits_processor(
                [comps[i].request_id for i in batched], [logits[i].view(1, 1, vocab) for i in batched],
                [[comps[i].context.prompt_token_ids + comps[i].context.output_token_ids] for i in batched],
                stream, [None] * len(batched))
        guided = [i for i, c in enumerate(comps) if c.params.guided_decoding is not None]
        if guided:
            for i in guided:
                if comps[i].matcher is None:
                    comps[i].matcher = self.guided_decoder.matcher(comps[i].params.guided_decoding)
            self.guided_decoder.apply(logits, guided, [comps[i].matcher for i in guided])
        return logits

    @staticmethod
    def needs_after_sample(comps: list[Any]) -> bool:
        """True if `after_sample` has work for these completions (generation logits, logprob ranks, a
        guided-decoding matcher); a step without any skips it."""
        return any(c.params.return_generation_logits or c.params.logprobs is not None or c.matcher is not None
                   for c in comps)

    def after_sample(self, raw: torch.Tensor, logits: torch.Tensor, tokens: list[int], comps: list[Any]) -> None:
        """Keep raw rows (return_generation_logits); record the rank of each sampled token in `logits` (what the
        sampler saw) where logprobs are asked for; advance the guided matchers."""
        for i, c in enumerate(comps):
            if c.params.return_generation_logits:
                c.generation_logits.append(raw[i].detach().float().cpu().clone())  # (V,)
        rows = [i for i, (c, t) in enumerate(zip(comps, tokens)) if t is not None and c.params.logprobs is not None]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            tok = torch.tensor([tokens[i] for i in rows], device=logits.device)
            sub = logits[idx].float()  # (len(rows), V)
            # NOTE: rank 1 is the most likely token; ties share the better rank
            ranks = ((sub > sub.gather(1, tok[:, None])).sum(dim=1) + 1).tolist()
            for i, r in zip(rows, ranks):
                comps[i].last_rank = int(r)
        for c, t in zip(comps, tokens):
            if t is not None and c.matcher is not None and not GuidedDecoder.accept(c.matcher, t):
                raise ValueError(f"request {c.request_id!r}: token {t} is outside its guided-decoding grammar")

    def __repr__(self) -> str:
        return (f"LogitsPass(batched={self.batched_logits_processor is not None}, "
                f"guided={self.guided_decoder is not None})")
