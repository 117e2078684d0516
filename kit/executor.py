"""The executor: a background loop that serves many requests at once.

Each iteration is the same five steps (TensorRT-LLM's executor and vLLM's engine core
have this shape too):

    out = scheduler.schedule()                     # who runs, how many tokens each
    batch = ForwardBatch.build(out.scheduled)      # flatten into one batch
    logits = engine.forward(batch, kv_cache)       # one forward pass for everyone
    tokens = sampler.sample(logits, contexts)      # next token per finished prompt / decode
    scheduler.update(out, tokens, verdicts)        # advance, append, stop, free blocks

`submit()` returns a `GenerationResult` at once: a future (`result()`, `await
aresult()`) that can also be iterated (or `async for`) to stream snapshots. An
exception inside the loop fails every pending request with that exception (nothing
hangs) and the loop goes on serving new ones. `stats()` is one row per iteration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import pandas as pd
import torch

from kit.batch import ForwardBatch, SequenceInput
from kit.engine import Engine
from kit.kv_cache import KVCacheInspector, KVCacheManager, gpu_memory_budget
from kit.outputs import CompletionOutput, RequestOutput
from kit.request import Request, RequestStatus
from kit.sampling import Sampler, SamplingContext, SamplingParams, find_stop, prompt_logprobs
from kit.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

__all__ = ["Executor", "GenerationRequest", "GenerationResult", "KvCacheConfig"]

_ids = itertools.count()


@dataclass(frozen=True)
class KvCacheConfig:
    """How big the paged KV pool is (exactly one way wins, in this order) and whether blocks are reused.

    `num_blocks`, else `max_tokens`, else `free_gpu_memory_fraction` of the GPU memory
    free after the weights are loaded, capped at `2 * max_batch_size * max_seq_len` tokens
    (CUDA only; on the CPU the default is `max_batch_size * max_seq_len` tokens, capped at 8192).
    """

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    num_blocks: int | None = None
    enable_block_reuse: bool = False  # prefix caching

    def __post_init__(self) -> None:
        if not 0.0 < self.free_gpu_memory_fraction <= 1.0:
            raise ValueError(f"KvCacheConfig.free_gpu_memory_fraction must be in (0, 1], "
                             f"got {self.free_gpu_memory_fraction}")
        for name in ("max_tokens", "num_blocks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"KvCacheConfig.{name} must be an integer >= 1 or None, got {v!r}")


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    request_id: str | None = None
    streaming: bool = False


class GenerationResult:
    """A future over one request's `RequestOutput`, and a stream of its snapshots."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request_id = request.request_id
        self.request = request
        self._cond = threading.Condition()
        self._history: list[RequestOutput] = []
        self._done = False
        self._error: BaseException | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # called by the executor's thread
    def _publish(self, out: RequestOutput | None, error: BaseException | None = None) -> None:
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
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    @property
    def done(self) -> bool:
        return self._done

    @property
    def outputs(self) -> RequestOutput | None:
        """The latest snapshot (None before the first)."""
        return self._history[-1] if self._history else None

    def _repr_html_(self) -> str:
        latest = self.outputs
        state = "failed" if self._error is not None else ("finished" if self._done else "running")
        inner = latest._repr_html_() if latest is not None else "<i>no output yet</i>"
        return f"<b>GenerationResult</b> <code>{self.request_id}</code> ({state})<br>{inner}"

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

    async def _wait_async(self, ready) -> None:
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
        await self._wait_async(lambda: self._done)
        return self.result(timeout=0)

    def __await__(self):
        return self.aresult().__await__()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        i = 0
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


class _Completion:
    """The executor's bookkeeping for one completion (one scheduler `Request`)."""

    def __init__(self, index: int, params: SamplingParams, detok: Any, generator: torch.Generator | None) -> None:
        self.index = index
        self.params = params
        self.detok = detok
        self.generator = generator
        self.text = ""
        self.emitted = 0  # characters of `text` already streamed
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.stop_reason: int | str | None = None
        self.finish_reason: str | None = None
        self.request: Request | None = None


class _Job:
    """One submitted request: its result, its completions, its prompt logprobs."""

    def __init__(self, greq: GenerationRequest, result: GenerationResult) -> None:
        self.greq = greq
        self.result = result
        self.completions: list[_Completion] = []
        self.prompt_logprob_rows: list[torch.Tensor] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0
        self.error: str | None = None


class Executor:
    """Runs an `Engine` over a stream of requests in a background thread."""

    def __init__(self, engine: Engine, *, tokenizer: Any = None, max_batch_size: int = 64,
                 max_num_tokens: int = 2048, max_input_len: int = 1024, max_seq_len: int = 2048,
                 block_size: int = 16, enable_chunked_prefill: bool = True, policy: Any = "guaranteed_no_evict",
                 kv_cache_config: KvCacheConfig | None = None, record_kv_cache: bool = False) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        kvc = kv_cache_config or KvCacheConfig()
        config = engine.config
        bytes_per_token = engine.kv_bytes_per_token
        if kvc.num_blocks is not None:
            budget = {"num_blocks": kvc.num_blocks}
        elif kvc.max_tokens is not None:
            budget = {"max_tokens": kvc.max_tokens}
        elif engine.device.type == "cuda":
            # NOTE: capped at twice what max_batch_size full-length sequences need: more only feeds the
            # prefix cache, and a notebook often holds other models on the same GPU
            cap = 2 * max_batch_size * max_seq_len * bytes_per_token
            budget = {"memory_bytes": min(cap, gpu_memory_budget(kvc.free_gpu_memory_fraction, engine.device))}
        else:
            budget = {"max_tokens": min(max_batch_size * max_seq_len, 8192)}
        self.kv_manager = KVCacheManager.from_budget(bytes_per_token, block_size, **budget,
                                                     enable_prefix_caching=kvc.enable_block_reuse)
        self.kv_cache = engine.allocate_kv_cache(self.kv_manager.num_blocks, block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                            enable_chunked_prefill=enable_chunked_prefill, policy=policy, max_seq_len=max_seq_len),
            self.kv_manager)
        self.inspector = KVCacheInspector(self.kv_manager)
        self.sampler = Sampler()
        self.eos_token_ids = tuple(config.eos_token_ids) or (
            (tokenizer.eos_token_id,) if tokenizer is not None and tokenizer.eos_token_id is not None else ())
        self.record_kv_cache = record_kv_cache
        self._kv_snapshots: list[pd.DataFrame] = []
        self._stats: list[dict[str, Any]] = []
        self._jobs: dict[str, _Job] = {}  # request id of the GenerationRequest -> job
        self._owner: dict[str, tuple[_Job, _Completion]] = {}  # scheduler request id -> (job, completion)
        self._inbox: list[_Job] = []
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False  # set under the lock when the loop has exited: submit refuses from then on
        self._iteration = 0
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="kit-executor", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------- API
    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Queue a request; raises ValueError at once for a prompt the engine cannot take."""
        self._validate(request)
        if request.request_id is None:
            request.request_id = f"req-{next(_ids)}"
        elif "#" in request.request_id:
            raise ValueError(f"request id {request.request_id!r}: '#' is reserved for the ids of n > 1 completions")
        result = GenerationResult(request)
        job = _Job(request, result)
        with self._lock:
            if self._closed or self._stop:
                raise RuntimeError("the executor is shut down")
            if request.request_id in self._jobs:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            self._jobs[request.request_id] = job
            self._inbox.append(job)
        self._wake.set()
        return result

    def abort(self, request_id: str) -> None:
        """Stop a request; its result finishes with finish_reason 'abort'. Unknown ids are ignored."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop and join its thread; requests still pending fail with RuntimeError."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def stats(self) -> pd.DataFrame:
        """One row per iteration. Columns: `iteration, time_s, duration_ms, request_ids,
        num_prefill_tokens, num_decode_tokens, batch_size, kv_blocks_used, kv_blocks_total,
        num_preemptions, preempted_request_ids, num_waiting`.

        `kv_blocks_used` is what the iteration held while it ran (taken when it was
        scheduled); the recorded block maps (`kv_cache_history`) are taken after it, once
        finished requests have given their blocks back.
        """
        with self._lock:
            rows = list(self._stats)
        return pd.DataFrame(rows, columns=[
            "iteration", "time_s", "duration_ms", "request_ids", "num_prefill_tokens", "num_decode_tokens",
            "batch_size", "kv_blocks_used", "kv_blocks_total", "num_preemptions", "preempted_request_ids",
            "num_waiting"])

    def kv_cache_history(self) -> pd.DataFrame:
        """Block maps recorded after every iteration (`record_kv_cache=True`), with a `step` column."""
        with self._lock:
            snaps = list(self._kv_snapshots)
        return pd.concat(snaps, ignore_index=True) if snaps else pd.DataFrame()

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()
            self._kv_snapshots.clear()

    # ------------------------------------------------------------- validation
    def _validate(self, r: GenerationRequest) -> None:
        n = len(r.prompt_token_ids)
        sp = r.sampling_params
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.max_input_len:
            raise ValueError(f"prompt has {n} tokens, more than this engine's max_input_len={self.max_input_len}")
        if n + sp.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({sp.max_tokens}) = {n + sp.max_tokens} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        cfg = self.scheduler.config
        if not cfg.enable_chunked_prefill and n > cfg.max_num_tokens:
            raise ValueError(f"prompt has {n} tokens but max_num_tokens={cfg.max_num_tokens} and chunked prefill is "
                             "off: enable chunked prefill or raise max_num_tokens")
        vocab = self.engine.config.vocab_size
        bad = [t for t in r.prompt_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {vocab}): {bad[:5]}")

    # ------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self._stop:
            try:
                self._drain_inbox()
                if not self.scheduler.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self.step()
            except Exception as e:  # noqa: BLE001 - any failure must reach the callers, not hang them
                self._fail_all(e)
        with self._lock:
            self._closed = True
        self._fail_all(RuntimeError("the executor was shut down before this request finished"))

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for job in inbox:
            self._admit(job)
        for rid in aborts:
            job = self._jobs.get(rid)
            if job is None:
                continue
            for c in job.completions:
                if c.request is not None and not c.request.is_finished:
                    self.scheduler.finish(c.request.request_id, RequestStatus.FINISHED_ABORTED)
                c.finish_reason = c.finish_reason or "abort"
            self._publish(job, final=True)

    def _admit(self, job: _Job) -> None:
        sp = job.greq.sampling_params
        comp = self._new_completion(job, 0, sp.seed)
        req = Request(job.greq.request_id, list(job.greq.prompt_token_ids), sp.max_tokens, arrival_time=job.arrival,
                      use_prefix_cache=sp.prompt_logprobs is None)
        self._attach(job, comp, req)
        try:
            self.scheduler.add_request(req)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            self._owner.pop(req.request_id, None)
            with self._lock:
                self._jobs.pop(job.greq.request_id, None)
            job.result._publish(None, e)

    def _new_completion(self, job: _Job, index: int, seed: int | None) -> _Completion:
        sp = job.greq.sampling_params
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        params = sp if seed == sp.seed else dataclasses.replace(sp, seed=seed)
        comp = _Completion(index, sp, detok, Sampler.make_generator(params, self.engine.device))
        job.completions.append(comp)
        return comp

    def _attach(self, job: _Job, comp: _Completion, req: Request) -> None:
        comp.request = req
        req.payload = SamplingContext(job.greq.sampling_params, req.prompt_token_ids, req.output_token_ids,
                                      comp.generator)
        self._owner[req.request_id] = (job, comp)

    # ------------------------------------------------------------------- step
    def step(self) -> SchedulerOutput:
        """One iteration: schedule, forward, sample, update, publish."""
        t_start = time.monotonic()
        out = self.scheduler.schedule()
        for rid, reason in out.rejected:
            job, comp = self._owner.pop(rid, (None, None))
            if job is not None:
                with self._lock:
                    self._jobs.pop(job.greq.request_id, None)
                job.result._publish(None, ValueError(f"request {job.greq.request_id!r} rejected: {reason}"))
        if not out.scheduled:
            return out
        seqs, rows = self._batch_inputs(out)
        batch = ForwardBatch.build(seqs, self.kv_manager.block_size, device=self.engine.device)
        logits = self.engine.forward(batch, self.kv_cache)
        sampled, verdicts, fresh = self._sample(out, logits, rows)
        finished = self.scheduler.update(out, sampled, verdicts)
        # NOTE: record before publishing, so a caller woken by its result sees this iteration's stats
        self._record(out, t_start)
        self._postprocess(out, sampled, finished, fresh)
        return out

    def _batch_inputs(self, out: SchedulerOutput) -> tuple[list[SequenceInput], list[tuple[int, int, bool]]]:
        """SequenceInputs for the batch and, per scheduled seq, (first logits row, rows, prompt rows?)."""
        seqs, rows, row = [], [], 0
        for s in out.scheduled:
            job, comp = self._owner[s.request_id]
            want_prompt = (job.greq.sampling_params.prompt_logprobs is not None and comp.index == 0
                           and job.prompt_logprobs is None and s.num_computed_tokens < len(job.greq.prompt_token_ids))
            if want_prompt and s.num_computed_tokens == 0:
                job.prompt_logprob_rows = []  # (re)starting the prompt, e.g. after a preemption
            mode = "all" if want_prompt else ("last" if s.is_last_chunk else "none")
            n = len(s.token_ids) if mode == "all" else int(mode == "last")
            seqs.append(SequenceInput(s.token_ids, s.num_computed_tokens, s.block_table, mode))
            rows.append((row, n, want_prompt))
            row += n
        return seqs, rows

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor, rows: list[tuple[int, int, bool]]):
        picks, contexts, owners = [], [], []
        for s, (first, n, prompt_rows) in zip(out.scheduled, rows):
            job, comp = self._owner[s.request_id]
            if prompt_rows:  # logits of prompt positions 0..P-2 predict prompt tokens 1..P-1
                job.prompt_logprob_rows.append(logits[first:first + n - int(s.is_last_chunk)].float().cpu())
                self._finish_prompt_logprobs(job)
            if not s.is_last_chunk:
                continue
            extra = []
            if comp.request.num_output_tokens == 0 and comp.index == 0 and job.greq.sampling_params.n > 1 \
                    and len(job.completions) == 1:
                # n > 1: the siblings sample their first tokens from the same logits row
                extra = [self._new_completion(job, i, None if job.greq.sampling_params.seed is None
                                              else job.greq.sampling_params.seed + i)
                         for i in range(1, job.greq.sampling_params.n)]
            for c in [comp, *extra]:
                picks.append(first + n - 1)
                ctx = comp.request.payload if c is comp else SamplingContext(
                    job.greq.sampling_params, comp.request.prompt_token_ids, [], c.generator)
                contexts.append(ctx)
                owners.append((s.request_id, job, c))
        if picks and picks != list(range(logits.shape[0])):
            logits = logits[picks]  # rows of prompt logprobs or siblings: pick the sampled ones
        result = self.sampler.sample(logits, contexts, self.eos_token_ids) if picks else None
        sampled: dict[str, int] = {}
        verdicts: dict[str, RequestStatus] = {}
        fresh: list[tuple[_Job, _Completion, int]] = []  # new siblings with their first token
        now = time.monotonic()
        for i, (rid, job, c) in enumerate(owners):
            token = result.token_ids[i]
            c.cumulative_logprob += result.logprobs[i]
            if c.logprobs is not None:
                c.logprobs.append(result.top_logprobs[i] or {token: result.logprobs[i]})
            job.first_token_time = job.first_token_time or now
            if c.request is None or c.request.request_id != rid:  # a sibling born this step
                fresh.append((job, c, token))
                continue
            sampled[rid] = token
            if self._is_stop(c, token):
                verdicts[rid] = RequestStatus.FINISHED_STOPPED
        return sampled, verdicts, fresh

    def _is_stop(self, c: _Completion, token: int) -> bool:
        """Decide whether `token` ends the completion (eos / stop token / stop string); update its text."""
        sp = c.params
        if c.detok is not None:
            start = len(c.text)
            c.text += c.detok.add(token)
            if sp.stop:
                cut = find_stop(c.text, start, sp.stop, sp.include_stop_str_in_output)
                if cut is not None:
                    inc = sp.include_stop_str_in_output
                    matched = [s for s in sp.stop if (c.text[cut - len(s):cut] if inc else c.text[cut:cut + len(s)]) == s]
                    c.stop_reason = matched[0] if matched else None
                    c.text = c.text[:cut]
                    c.finish_reason = "stop"
                    return True
        if token in sp.stop_token_ids:
            c.stop_reason, c.finish_reason = token, "stop"
            return True
        if token in self.eos_token_ids and not sp.ignore_eos:
            c.finish_reason = "stop"
            return True
        return False

    def _postprocess(self, out: SchedulerOutput, sampled: dict[str, int], finished: tuple[str, ...],
                     fresh: list[tuple[_Job, _Completion, int]]) -> None:
        touched: dict[str, _Job] = {}
        for rid in sampled:
            job, comp = self._owner[rid]
            touched[job.greq.request_id] = job
            if comp.request.num_output_tokens == 1 and job.num_cached_tokens == 0:
                job.num_cached_tokens = comp.request.num_cached_tokens
        for job, c, token in fresh:  # fork siblings once the first completion holds its prompt blocks
            parent = job.completions[0].request
            req = Request(f"{job.greq.request_id}#{c.index}", list(parent.prompt_token_ids),
                          job.greq.sampling_params.max_tokens, arrival_time=job.arrival, output_token_ids=[token])
            self._attach(job, c, req)
            if self._is_stop(c, token) or job.greq.sampling_params.max_tokens == 1:
                if c.finish_reason is None:
                    c.finish_reason = "length"
                    if c.detok is not None:
                        c.text += c.detok.flush()
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                try:
                    if parent.is_finished:
                        self.scheduler.add_request(req)
                    else:
                        self.scheduler.fork(parent.request_id, req)
                except ValueError as e:  # e.g. this completion can never fit the pool: it ends with the error
                    c.finish_reason = "error"
                    req.status = RequestStatus.FINISHED_ERROR
                    job.error = str(e)
            touched[job.greq.request_id] = job
        for rid in finished:
            job, comp = self._owner.pop(rid)
            if comp.finish_reason is None:
                comp.finish_reason = comp.request.status.finish_reason
            if comp.detok is not None and comp.finish_reason != "stop":
                comp.text += comp.detok.flush()
        for job in touched.values():
            self._publish(job, final=all(c.finish_reason is not None for c in job.completions)
                          and len(job.completions) == job.greq.sampling_params.n)

    def _finish_prompt_logprobs(self, job: _Job) -> None:
        prompt = list(job.greq.prompt_token_ids)
        if sum(r.shape[0] for r in job.prompt_logprob_rows) == len(prompt) - 1:
            rows = torch.cat(job.prompt_logprob_rows) if job.prompt_logprob_rows else torch.empty(0)
            job.prompt_logprobs = (prompt_logprobs(rows, prompt, job.greq.sampling_params.prompt_logprobs)
                                   if len(prompt) > 1 else [None])
            job.prompt_logprob_rows = []

    def _publish(self, job: _Job, final: bool) -> None:
        sp = job.greq.sampling_params
        if final:
            with self._lock:
                self._jobs.pop(job.greq.request_id, None)
            for c in job.completions:
                if c.request is not None:
                    self._owner.pop(c.request.request_id, None)
        elif not job.greq.streaming:
            return
        outputs = []
        for c in job.completions:
            # hold back a tail that could still become a stop string while streaming
            hold = 0 if c.finish_reason is not None or not sp.stop else max(map(len, sp.stop)) - 1
            visible = c.text[:max(c.emitted, len(c.text) - hold)]
            tokens = list(c.request.output_token_ids) if c.request is not None else []
            outputs.append(CompletionOutput(c.index, visible, tokens, c.finish_reason, c.cumulative_logprob,
                                            list(c.logprobs) if c.logprobs is not None else None, c.stop_reason,
                                            text_diff=visible[c.emitted:]))
            c.emitted = len(visible)
        now = time.monotonic()
        metrics = {"arrival_time": job.arrival, "first_token_time": job.first_token_time,
                   "finished_time": now if final else None, "num_cached_tokens": job.num_cached_tokens}
        job.result._publish(RequestOutput(job.greq.request_id, job.greq.prompt, list(job.greq.prompt_token_ids),
                                          outputs, final, job.prompt_logprobs, metrics, error=job.error))

    def _record(self, out: SchedulerOutput, t_start: float) -> None:
        self._iteration += 1
        row = {
            "iteration": self._iteration, "time_s": t_start - self._t0,
            "duration_ms": 1e3 * (time.monotonic() - t_start),
            "request_ids": [s.request_id for s in out.scheduled],
            "num_prefill_tokens": out.num_prefill_tokens, "num_decode_tokens": out.num_decode_tokens,
            "batch_size": out.batch_size, "kv_blocks_used": out.kv_blocks_used,
            "kv_blocks_total": self.kv_manager.num_blocks,
            "num_preemptions": len(out.preempted_request_ids),
            "preempted_request_ids": list(out.preempted_request_ids), "num_waiting": out.num_waiting}
        snap = self.inspector.snapshot(step=self._iteration) if self.record_kv_cache else None
        with self._lock:
            self._stats.append(row)
            if snap is not None:
                self._kv_snapshots.append(snap)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every pending request with `error` and return the scheduler to empty."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            jobs = list(self._jobs.values()) + inbox
            self._jobs.clear()
        for job in jobs:
            for c in job.completions:
                if c.request is not None and not c.request.is_finished:
                    self.scheduler.finish(c.request.request_id, RequestStatus.FINISHED_ERROR)
            job.result._publish(None, error)
        self._owner.clear()

    def __repr__(self) -> str:
        return (f"Executor({self.engine.network.name!r}, blocks={self.kv_manager.num_blocks}x"
                f"{self.kv_manager.block_size}, {self.scheduler!r})")

    def _repr_html_(self) -> str:
        df = self.stats()
        summary = (f"<b>Executor</b> &middot; {len(df)} iterations &middot; running {self.scheduler.num_running}, "
                   f"waiting {self.scheduler.num_waiting} &middot; thread {'alive' if self.is_alive else 'stopped'}")
        tail = df.tail(8).to_html(index=False, border=0) if len(df) else "<p><i>no iterations yet</i></p>"
        return f"<div>{summary}{tail}{self.inspector._repr_html_()}</div>"
