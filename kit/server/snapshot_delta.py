"""Streamed snapshots as deltas, for the pipe between the engine process and the HTTP process.

A streamed `RequestOutput` is cumulative: every snapshot repeats the prompt ids, all the
token ids, the text and the logprobs so far. Pickling it per token per request made the
pipe (and the unpickling in the HTTP process, under its GIL) cost O(length) per token.
`SnapshotEncoder` (engine side) sends what is new since the previous snapshot of the same
request; `SnapshotDecoder` (HTTP side) rebuilds the full snapshot from the previous one, so
the HTTP side sees exactly the `RequestOutput`s the engine published.

    delta = (head | None, finished, metrics, error, [completion delta, ...])
    head  = (request_id, prompt, prompt_token_ids, prompt_logprobs, context_logits)   (first snapshot)
    completion delta = (index, keep_tokens, new_ids, keep_chars, new_text, new_logprobs | None,
                        text_diff | None, token_ids_diff | None, logprobs_diff | None,
                        finish_reason, cumulative_logprob, stop_reason, generation_logits, spec_stats)

`keep_*` say how much of the previous snapshot's completion stays (all of it, unless the
new one is not an extension: then 0 and the whole value travels); a `*_diff` of None
means "equal to the new part".
"""

from __future__ import annotations

from kit.outputs import CompletionOutput, RequestOutput

__all__ = ["SnapshotEncoder", "SnapshotDecoder"]


class SnapshotEncoder:
    """Engine side: remembers each request's last snapshot and encodes the next as a delta."""

    def __init__(self) -> None:
        self._prev: dict[str, dict[int, CompletionOutput]] = {}

    def encode(self, key: str, out: RequestOutput) -> tuple:
        prev = self._prev.get(key)
        head = None
        if prev is None:
            prev = {}
            head = (out.request_id, out.prompt, out.prompt_token_ids, out.prompt_logprobs, out.context_logits)
        comps = []
        for c in out.outputs:
            comps.append(_encode_completion(c, prev.get(c.index)))
        if out.finished:
            self._prev.pop(key, None)
        else:
            self._prev[key] = {c.index: c for c in out.outputs}
        return head, out.finished, out.metrics, out.error, comps

    def forget(self, key: str) -> None:
        self._prev.pop(key, None)


def _encode_completion(c: CompletionOutput, p: CompletionOutput | None) -> tuple:
    k = len(p.token_ids) if p is not None else 0
    chars = len(p.text) if p is not None else 0
    extends = (p is not None and len(c.token_ids) >= k and c.token_ids[:k] == p.token_ids
               and c.text.startswith(p.text) and (c.logprobs is None) == (p.logprobs is None)
               and (c.logprobs is None or (len(p.logprobs) == k and len(c.logprobs) == len(c.token_ids))))
    if not extends:
        k = chars = 0
    new_ids = c.token_ids[k:]
    new_text = c.text[chars:]
    new_lp = c.logprobs[k:] if c.logprobs is not None else None
    return (c.index, k, new_ids, chars, new_text, new_lp,
            None if c.text_diff == new_text else c.text_diff,
            None if c.token_ids_diff == new_ids else c.token_ids_diff,
            None if c.logprobs_diff == (new_lp or []) else c.logprobs_diff,
            c.finish_reason, c.cumulative_logprob, c.stop_reason, c.generation_logits, c.spec_stats)


class SnapshotDecoder:
    """HTTP side: rebuilds the full `RequestOutput` from a delta and the request's previous snapshot."""

    @staticmethod
    def decode(delta: tuple, prev: RequestOutput | None) -> RequestOutput:
        head, finished, metrics, error, comps = delta
        if head is not None:
            request_id, prompt, prompt_ids, prompt_logprobs, context_logits = head
        elif prev is not None:
            request_id, prompt, prompt_ids = prev.request_id, prev.prompt, prev.prompt_token_ids
            prompt_logprobs, context_logits = prev.prompt_logprobs, prev.context_logits
        else:
            raise ValueError("a snapshot delta without its head arrived before the request's first snapshot")
        before = {c.index: c for c in prev.outputs} if prev is not None and head is None else {}
        outputs = []
        for (index, k, new_ids, chars, new_text, new_lp, text_diff, ids_diff, lp_diff, finish, cum_lp, stop_reason,
             gen_logits, spec) in comps:
            p = before.get(index)
            if k or chars:
                if p is None:
                    raise ValueError(f"a snapshot delta extends completion {index}, which was never sent")
                token_ids = (p.token_ids if k == len(p.token_ids) else p.token_ids[:k]) + new_ids
                text = (p.text if chars == len(p.text) else p.text[:chars]) + new_text
                logprobs = p.logprobs[:k] + new_lp if new_lp is not None else None
            else:
                token_ids, text, logprobs = list(new_ids), new_text, new_lp
            outputs.append(CompletionOutput(
                index, text, token_ids, finish, cum_lp, logprobs, stop_reason,
                text_diff=new_text if text_diff is None else text_diff,
                token_ids_diff=list(new_ids) if ids_diff is None else ids_diff,
                generation_logits=gen_logits,
                logprobs_diff=(list(new_lp) if new_lp is not None else []) if lp_diff is None else lp_diff,
                spec_stats=spec))
        return RequestOutput(request_id, prompt, prompt_ids, outputs, finished, prompt_logprobs, metrics, error=error,
                             context_logits=context_logits)

    def __repr__(self) -> str:
        return "SnapshotDecoder()"
