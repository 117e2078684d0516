"""What a generation returns: `RequestOutput` holding one `CompletionOutput` per sample.

The names and fields follow vLLM's and TensorRT-LLM's `LLM` API. While streaming, each
`RequestOutput` is a snapshot: `text` is everything so far and `text_diff` the piece
added since the previous snapshot, so joining the diffs gives the final text.

`GenerationResult` is what `Executor.submit` returns: a future over the final
`RequestOutput` (`result()`, `await`) and a stream of snapshots (`for` / `async for`).
A stream that is abandoned (the consumer breaks out, raises, or its asyncio task is
cancelled) aborts its request, so nothing computes for nobody.
"""

from __future__ import annotations

import asyncio
import html
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

__all__ = ["CompletionOutput", "GenerationResult", "Logprob", "RequestOutput", "TokenLogprobs"]


@dataclass
class Logprob:
    """The log probability of one token and its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int | None = None


# per generated token: token id -> Logprob (the top `logprobs` ids and the sampled one)
TokenLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One completion of a request (TensorRT-LLM's fields).

    `token_ids` and `text` end at the same place: without the end (eos) token, and without the
    stop token / stop string that ended it unless `include_stop_str_in_output`. While
    streaming, `text_diff` / `token_ids_diff` / `logprobs_diff` are what this snapshot added.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | None while running
    cumulative_logprob: float | None = 0.0
    logprobs: TokenLogprobs | None = None  # per generated token, when asked for
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text_diff: str = ""  # streaming: text added since the previous snapshot
    token_ids_diff: list[int] = field(default_factory=list)
    generation_logits: Any = None  # torch.Tensor (len(token_ids), vocab) with return_generation_logits
    logprobs_diff: TokenLogprobs = field(default_factory=list)
    spec_stats: Any = None  # speculative decoding: a kit.speculative.SpeculativeStats (None without it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.token_ids)


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
    context_logits: Any = None  # torch.Tensor (len(prompt_token_ids), vocab) with return_context_logits

    @property
    def text(self) -> str:
        """The first completion's text."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def spec_stats(self) -> Any:
        """Speculative decoding: the completions' `SpeculativeStats` summed (None without speculation)."""
        stats = [o.spec_stats for o in self.outputs if o.spec_stats is not None]
        return sum(stats[1:], stats[0]) if stats else None

    def __repr__(self) -> str:
        state = "finished" if self.finished else "running"
        reasons = ",".join(str(o.finish_reason) for o in self.outputs)
        return (f"RequestOutput({self.request_id!r}, {state}, prompt={len(self.prompt_token_ids)} tokens, "
                f"outputs={[len(o.token_ids) for o in self.outputs]} tokens, finish={reasons}, text={self.text!r:.60})")

    def _repr_html_(self) -> str:
        prompt = html.escape(self.prompt if self.prompt is not None else str(self.prompt_token_ids[:20]))
        rows = "".join(
            f"<tr><td>{o.index}</td><td style='white-space:pre-wrap;text-align:left'>{html.escape(o.text)}</td>"
            f"<td>{len(o.token_ids)}</td><td>{o.finish_reason}</td><td>{o.cumulative_logprob or 0.0:.2f}</td></tr>"
            for o in self.outputs)
        err = f"<p style='color:#b00'>error: {html.escape(self.error)}</p>" if self.error else ""
        return (f"<b>RequestOutput</b> <code>{html.escape(self.request_id)}</code> "
                f"({'finished' if self.finished else 'running'})<br><i>prompt</i>: "
                f"<span style='white-space:pre-wrap'>{prompt}</span>{err}"
                f"<table><tr><th>#</th><th>text</th><th>tokens</th><th>finish</th><th>logprob</th></tr>{rows}</table>")


class GenerationResult:
    """A future over one request's `RequestOutput`, and a stream of its snapshots.

    Like TensorRT-LLM's `GenerationResult` it also reads as the latest snapshot: `outputs`
    (a list of `CompletionOutput`, empty before the first token), `finished`, `prompt`,
    `prompt_token_ids`, `context_logits`; `abort()` cancels the request.

    `on_abandon(request_id)` (the executor's `abort`) is called when a consumer stops
    waiting for an unfinished request: a closed iterator, a cancelled `await`, `abort()`.
    """

    def __init__(self, request_id: str, on_abandon: Callable[[str], None] | None = None, *,
                 prompt: str | None = None, prompt_token_ids: list[int] | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids) if prompt_token_ids is not None else []
        self._on_abandon = on_abandon
        self._cond = threading.Condition()
        self._history: list[RequestOutput] = []
        self._done = False
        self._error: BaseException | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._listeners: list[Callable[[RequestOutput | None, BaseException | None], None]] = []

    def add_listener(self, fn: Callable[[RequestOutput | None, BaseException | None], None]) -> None:
        """Call `fn(snapshot, error)` for every snapshot published so far and from now on (in the
        publishing thread; keep it short). The end comes as a finished snapshot or an error."""
        with self._cond:
            for out in self._history:
                fn(out, None)
            if self._error is not None:
                fn(None, self._error)
            self._listeners.append(fn)

    def publish(self, out: RequestOutput | None, error: BaseException | None = None, *,
                wake: list | None = None) -> None:
        """Add a snapshot (the executor's thread), or end the request with `error`. With `wake` (a list),
        the asyncio waiters are appended to it instead of woken, so that a caller publishing many
        results can wake each event loop once."""
        with self._cond:
            if self._done:
                return
            if out is not None:
                self._history.append(out)
                self._done = out.finished
            if error is not None:
                self._error, self._done = error, True
            self._cond.notify_all()
            waiters = list(self._async_waiters)
            for fn in self._listeners:
                fn(out, error)
        if wake is not None:
            wake.extend(waiters)
            return
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    def _abandon(self) -> None:
        if not self._done and self._on_abandon is not None:
            self._on_abandon(self.request_id)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def latest(self) -> RequestOutput | None:
        """The latest snapshot (None before the first)."""
        return self._history[-1] if self._history else None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """The latest snapshot's completions ([] before the first)."""
        latest = self.latest
        return latest.outputs if latest is not None else []

    @property
    def finished(self) -> bool:
        return self._done and self._error is None

    @property
    def context_logits(self) -> Any:
        latest = self.latest
        return latest.context_logits if latest is not None else None

    def abort(self) -> None:
        """Cancel the request: it finishes with finish_reason 'cancelled' (no-op once finished)."""
        self._abandon()

    def snapshots(self, start: int = 0) -> list[RequestOutput]:
        """The snapshots published so far, from index `start`."""
        with self._cond:
            return self._history[start:]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a new snapshot or the end, at most `timeout` s; True if done."""
        with self._cond:
            self._cond.wait(timeout)
            return self._done

    def _repr_html_(self) -> str:
        latest = self.latest
        state = "failed" if self._error is not None else ("finished" if self._done else "running")
        inner = latest._repr_html_() if latest is not None else "<i>no output yet</i>"
        return f"<b>GenerationResult</b> <code>{html.escape(str(self.request_id))}</code> ({state})<br>{inner}"

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until finished; raise the request's error if it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._history[-1]

    def __iter__(self) -> Iterator[RequestOutput]:
        i = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: len(self._history) > i or self._done)
                    new, done, error = self._history[i:], self._done, self._error
                i += len(new)
                yield from new
                if done and i == len(self._history):
                    if error is not None:
                        raise error
                    return
        finally:  # GeneratorExit (break, an exception in the consumer, garbage collection)
            self._abandon()

    async def _wait_async(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        try:
            while not ready():
                await event.wait()
                event.clear()
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))

    async def aresult(self) -> RequestOutput:
        try:
            await self._wait_async(lambda: self._done)
        except asyncio.CancelledError:
            self._abandon()
            raise
        return self.result(timeout=0)

    def __await__(self):
        return self.aresult().__await__()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        i = 0
        try:
            while True:
                await self._wait_async(lambda: len(self._history) > i or self._done)
                with self._cond:
                    new, done, error = self._history[i:], self._done, self._error
                i += len(new)
                for out in new:
                    yield out
                if done and i == len(self._history):
                    if error is not None:
                        raise error
                    return
        finally:  # CancelledError, GeneratorExit (aclose / break)
            self._abandon()
