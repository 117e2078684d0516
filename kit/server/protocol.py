"""OpenAI's request and response bodies (completions, chat completions, models, errors).

Requests are pydantic models: a wrong type is refused by pydantic with the field's name,
a wrong value by `SamplingParams` with the kit's own message. Responses are plain dicts
built by the functions below, in OpenAI's field names, so that the official `openai`
client parses them. Extra request fields follow vLLM's extensions (`top_k`, `min_p`,
`min_tokens`, `ignore_eos`, `repetition_penalty`, `stop_token_ids`,
`include_stop_str_in_output`); fields OpenAI has and the kit does not are refused, not ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from kit.outputs import CompletionOutput
from kit.sampling_params import SamplingParams

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "error_body",
           "new_id", "usage", "completion_logprobs", "chat_logprobs", "model_card"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share, and their translation to `SamplingParams`."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # OpenAI's seed is an int64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: bool = False

    def _check_unsupported(self) -> None:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int) -> SamplingParams:
        self._check_unsupported()
        bad = [t for t in self.stop_token_ids or () if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {bad[:5]}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, seed=self.seed,
            n=self.n, logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a list of either."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def _check_unsupported(self) -> None:
        super()._check_unsupported()
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n ({self.n}) on this server, got {self.best_of}")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError(f"messages: only text content parts are supported, got {p.get('type')!r}")
            parts.append(p["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs: the number of top alternatives, None when not asked."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _top(entry: dict[int, Any], token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The sampled token's logprob and the k best alternatives (the sampler's dict holds both)."""
    entry = {t: getattr(v, "logprob", v) for t, v in entry.items()}  # Logprob(logprob, rank) -> float
    best = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]
    return entry[token], best


def completion_logprobs(c: CompletionOutput, start: int, k: int, decode, text_offset: int) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object for tokens [start:] of `c`."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = text_offset
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        lp, best = _top(entry, tid, k)
        piece = decode(tid)
        tokens.append(piece)
        lps.append(lp)
        tops.append({decode(t): v for t, v in best} if k else None)
        offsets.append(pos)
        pos += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, start: int, k: int, decode) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object ({"content": [...]}) for tokens [start:] of `c`."""
    content = []
    for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        lp, best = _top(entry, tid, k)
        piece = decode(tid)
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": decode(t), "logprob": v, "bytes": list(decode(t).encode())}
                                         for t, v in best]})
    return {"content": content}


def model_card(name: str, max_model_len: int, vocab_size: int, created: int | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created or int(time.time()), "owned_by": "kit",
            "max_model_len": max_model_len, "vocab_size": vocab_size}
