"""From a parsed OpenAI request to the engine and back: `OpenAIServing`.

One HTTP request may hold several prompts (completions) and `n` samples each; choice
`index` is `prompt_index * n + sample_index`, as in OpenAI's API. Non-streamed answers
wait for every prompt; streamed answers are server-sent events, one chunk per snapshot
(or per several, joined, when the client is behind), ending with `data: [DONE]`. A client that goes away (disconnect, or a
cancelled handler) aborts every request it still had running, so their KV blocks come
back at the executor's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from kit.executor import GenerationResult
from kit.outputs import RequestOutput
from kit.sampling_params import SamplingParams
from kit.server.engine_client import EngineClient
from kit.server.metrics import ServerMetrics
from kit.server.protocol import (ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs,
                                 error_body, new_id, usage)

__all__ = ["OpenAIServing", "APIError"]

_json_str = json.encoder.encode_basestring_ascii  # str -> its JSON string literal (what json.dumps gives)


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code if self.code is not None else self.status)


def _param_of(message: str) -> str | None:
    """'SamplingParams.temperature must be ...' -> 'temperature' (the request field it came from)."""
    head = message.split(" ", 1)[0]
    return head.split(".", 1)[1] if head.startswith("SamplingParams.") else None


@dataclass
class _Run:
    """One prompt's request inside an HTTP request: its result and what was sent so far."""

    result: GenerationResult
    prompt_len: int
    sent_tokens: dict[int, int] = field(default_factory=dict)  # sample index -> tokens sent
    sent_chars: dict[int, int] = field(default_factory=dict)  # sample index -> characters of text sent
    seen: int = 0  # snapshots of `result` sent (streaming)
    finished: set[int] = field(default_factory=set)  # sample indices whose finish_reason was sent
    last: RequestOutput | None = None
    recorded: bool = False
    arrival: float = 0.0  # time.monotonic() when the HTTP request came in


class OpenAIServing:
    """Submits the prompts of one request, and shapes the outputs as OpenAI's responses."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, model_name: str, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.max_queue = max_queue  # requests that may wait beyond a full batch; more get 503

    # ------------------------------------------------------------------ admission
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def _prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [self.engine.encode(p)]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return [self.engine.encode(x) if isinstance(x, str) else list(x) for x in p]

    def _submit(self, prompts: list[list[int]], make_params: Callable[[int], SamplingParams],
                streaming: bool) -> list[_Run]:
        limit = self.engine.limits.max_batch_size + self.max_queue
        if self.metrics.in_flight + len(prompts) > limit:
            raise APIError(503, f"the server is full: {self.metrics.in_flight} requests in flight, limit "
                           f"{limit} (max_batch_size {self.engine.limits.max_batch_size} + max_queue "
                           f"{self.max_queue}); retry later", type_="service_unavailable_error")
        runs: list[_Run] = []
        try:
            params = [make_params(len(p)) for p in prompts]
            for i, (p, sp) in enumerate(zip(prompts, params)):
                try:
                    runs.append(_Run(self.engine.submit(p, sp, streaming), len(p)))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
        except (ValueError, TypeError) as e:
            for r in runs:
                self.engine.abort(r.result.request_id)
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        except RuntimeError as e:  # the executor is shutting down
            raise APIError(503, str(e), type_="service_unavailable_error") from None
        for r in runs:
            self.metrics.admitted(r.prompt_len)
        return runs

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        return requested if requested is not None else max(1, self.engine.limits.max_seq_len - prompt_len)

    def start_completion(self, req: CompletionRequest) -> list[_Run]:
        self.check_model(req.model)
        try:
            prompts = self._prompts(req)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        return self._submit(prompts, lambda n: req.sampling_params(self._max_tokens(req.max_tokens, n), req.logprobs,
                                                          self.engine.limits.vocab_size),
                            req.stream)

    def start_chat(self, req: ChatCompletionRequest) -> list[_Run]:
        self.check_model(req.model)
        try:
            prompt = self.engine.chat_prompt(req.conversation())
            k = req.logprobs_k()
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        vocab = self.engine.limits.vocab_size
        return self._submit([prompt], lambda n: req.sampling_params(self._max_tokens(max_tokens, n), k, vocab),
                            req.stream)

    # -------------------------------------------------------------- bookkeeping
    def _record(self, run: _Run, aborted: bool = False) -> None:
        if run.recorded:
            return
        run.recorded = True
        out = run.last
        outs = out.outputs if out is not None else []
        reason = "abort" if aborted else ((outs[0].finish_reason if outs else None) or "error")
        m = out.metrics if out is not None else {}
        self.metrics.done(reason, sum(len(c.token_ids) for c in outs), run.arrival, m.get("first_token_time"),
                          m.get("finished_time"), len(outs[0].token_ids) if outs else 0)

    def abandon(self, runs: list[_Run]) -> None:
        """The client is gone: abort what still runs, count it as aborted."""
        for r in runs:
            if not r.recorded:
                if not r.result.done:
                    self.engine.abort(r.result.request_id)
                self._record(r, aborted=not r.result.done)

    # ---------------------------------------------------------------- responses
    async def collect(self, runs: list[_Run], arrival: float, is_disconnected) -> list[RequestOutput]:
        """Wait for every run; abort them all if the client disconnects first."""
        for r in runs:
            r.arrival = arrival
        task = asyncio.ensure_future(asyncio.gather(*(r.result.aresult() for r in runs)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
                if await is_disconnected():
                    task.cancel()
                    self.abandon(runs)
                    raise APIError(499, "the client closed the connection")
            outs = task.result()
        except asyncio.CancelledError:
            self.abandon(runs)
            raise
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine failed these requests
            self.abandon(runs)
            raise APIError(500, f"generation failed: {e}", type_="server_error") from None
        for r, o in zip(runs, outs):
            r.last = o
            self._record(r)
        return outs

    def completion_body(self, req: CompletionRequest, runs: list[_Run], outs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for pi, out in enumerate(outs):
            for c in out.outputs:
                lp = (completion_logprobs(c, 0, req.logprobs, self.engine.decode_token, 0)
                      if req.logprobs is not None else None)
                choices.append({"index": pi * req.n + c.index, "text": c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": sorted(choices, key=lambda ch: ch["index"]),
                "usage": self._usage(runs, outs)}

    def chat_body(self, req: ChatCompletionRequest, runs: list[_Run], outs: list[RequestOutput]) -> dict[str, Any]:
        k = req.logprobs_k()
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, 0, k, self.engine.decode_token) if k is not None else None,
                    "finish_reason": c.finish_reason} for c in outs[0].outputs]
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(runs, outs)}

    @staticmethod
    def _usage(runs: list[_Run], outs: list[RequestOutput | None]) -> dict[str, int]:
        gen = sum(len(c.token_ids) for o in outs if o is not None for c in o.outputs)
        return usage(sum(r.prompt_len for r in runs), gen)

    async def stream(self, req: CompletionRequest | ChatCompletionRequest, runs: list[_Run],
                     arrival: float) -> AsyncIterator[str]:
        """Server-sent events for `runs`; aborts them if the client goes away mid-stream.

        NOTE: a chunk carries every snapshot published since the last chunk of its request (as vLLM
        does when a stream's consumer is behind): the texts of the snapshots join into one delta,
        logprobs keep one entry per token, so the joined text and the usage are the same either way."""
        chat = isinstance(req, ChatCompletionRequest)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        k = req.logprobs_k() if chat else req.logprobs
        for r in runs:
            r.arrival = arrival
        # NOTE: every chunk has the same head; only the choices are encoded per chunk
        head = (f'data: {{"id": {_json_str(rid)}, "object": "{obj}", "created": {created}, '
                f'"model": {_json_str(self.model_name)}, "choices": [')
        tail = '], "usage": null}\n\n' if req.include_usage else ']}\n\n'
        text_key = '"delta": {"content": ' if chat else '"text": '
        text_end = '}' if chat else ''

        try:
            if chat:
                yield head + ", ".join(f'{{"index": {i}, "delta": {{"role": "assistant", "content": ""}}, '
                                       f'"logprobs": null, "finish_reason": null}}' for i in range(req.n)) + tail
            async for pi, _ in _merge([r.result for r in runs]):
                run = runs[pi]
                snaps = run.result.snapshots(run.seen)  # this snapshot and any published after it
                if not snaps:  # already sent with an earlier chunk
                    continue
                run.seen += len(snaps)
                out = run.last = snaps[-1]
                choices = []
                for c in out.outputs:
                    start = run.sent_tokens.get(c.index, 0)
                    finish = c.finish_reason if c.finish_reason and c.index not in run.finished else None
                    text = "".join(o.text_diff for s in snaps for o in s.outputs if o.index == c.index) \
                        if len(snaps) > 1 else c.text_diff
                    if not (text or finish or len(c.token_ids) > start):  # one chunk per new token (or tokens)
                        continue
                    if k is None:
                        lp = "null"
                    elif chat:
                        lp = json.dumps(chat_logprobs(c, start, k, self.engine.decode_token))
                    else:
                        offset = run.sent_chars.get(c.index, 0)
                        lp = json.dumps(completion_logprobs(c, start, k, self.engine.decode_token, offset))
                    run.sent_tokens[c.index] = len(c.token_ids)
                    run.sent_chars[c.index] = run.sent_chars.get(c.index, 0) + len(text)
                    if finish:
                        run.finished.add(c.index)
                    choices.append(f'{{"index": {pi * req.n + c.index}, {text_key}{_json_str(text)}{text_end}, '
                                   f'"logprobs": {lp}, "finish_reason": {_json_str(finish) if finish else "null"}}}')
                if out.finished:
                    self._record(run)
                if choices:
                    yield head + ", ".join(choices) + tail
            if req.include_usage:
                yield head + '], "usage": ' + json.dumps(self._usage(runs, [r.last for r in runs])) + "}\n\n"
        except Exception as e:  # noqa: BLE001 - the engine failed: tell the client, then end the stream
            self.abandon(runs)
            yield f"data: {json.dumps(error_body(f'generation failed: {e}', 'server_error', code=500))}\n\n"
        finally:
            self.abandon(runs)  # a no-op for runs already recorded; aborts the rest (client gone)
        yield "data: [DONE]\n\n"


async def _merge(results: list[GenerationResult]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Snapshots of several results as they come, tagged with the result's position."""
    if len(results) == 1:
        async for out in results[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, r: GenerationResult) -> None:
        try:
            async for out in r:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(results)]
    try:
        left = len(results)
        while left:
            i, item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
