"""What a generation returns: `RequestOutput` holding one `CompletionOutput` per sample.

The names and fields follow vLLM's and TensorRT-LLM's `LLM` API. While streaming, each
`RequestOutput` is a snapshot: `text` is everything so far and `text_diff` the piece
added since the previous snapshot, so joining the diffs gives the final text.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompletionOutput", "RequestOutput"]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None  # per generated token, when asked for
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text_diff: str = ""  # streaming: text added since the previous snapshot
    token_ids_diff: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # arrival/first_token/finished times, cached tokens
    error: str | None = None

    @property
    def text(self) -> str:
        """The first completion's text."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    def __repr__(self) -> str:
        state = "finished" if self.finished else "running"
        reasons = ",".join(str(o.finish_reason) for o in self.outputs)
        return (f"RequestOutput({self.request_id!r}, {state}, prompt={len(self.prompt_token_ids)} tokens, "
                f"outputs={[len(o.token_ids) for o in self.outputs]} tokens, finish={reasons}, text={self.text!r:.60})")

    def _repr_html_(self) -> str:
        prompt = html.escape(self.prompt if self.prompt is not None else str(self.prompt_token_ids[:20]))
        rows = "".join(
            f"<tr><td>{o.index}</td><td style='white-space:pre-wrap;text-align:left'>{html.escape(o.text)}</td>"
            f"<td>{len(o.token_ids)}</td><td>{o.finish_reason}</td><td>{o.cumulative_logprob:.2f}</td></tr>"
            for o in self.outputs)
        err = f"<p style='color:#b00'>error: {html.escape(self.error)}</p>" if self.error else ""
        return (f"<b>RequestOutput</b> <code>{html.escape(self.request_id)}</code> "
                f"({'finished' if self.finished else 'running'})<br><i>prompt</i>: "
                f"<span style='white-space:pre-wrap'>{prompt}</span>{err}"
                f"<table><tr><th>#</th><th>text</th><th>tokens</th><th>finish</th><th>logprob</th></tr>{rows}</table>")
