"""The executor: a background loop that serves many requests at once.

Each iteration is the same steps (TensorRT-LLM's executor and vLLM's engine core
have this shape too), and `step()` reads exactly so:

    out = scheduler.schedule()                           # who runs, how many tokens each
    batch = ForwardBatch.build(out.scheduled)            # flatten into one batch
    logits = engine.forward(batch, kv_cache)             # one forward pass for everyone
    sampled = sampler.sample_async(logits, contexts)     # next token per finished prompt / decode (device)
    scheduler.advance(out)                               # computed tokens move on, placeholders appended
    verdicts = output_processor.add_token(...)           # every stop decision, once per token
    scheduler.commit(tokens, verdicts)                   # tokens over placeholders, free finished blocks
    output_processor.publish(...)                        # snapshots to the callers

With `overlap` (on by default on CUDA) the last three lines of step N run after step N + 1
was launched, while the device computes it (kit/executor_loop.py tells how).

`submit()` validates a request (the one validation path: types in `GenerationRequest`,
ranges here) and returns a `GenerationResult` at once. A failure that belongs to one
request (its sampler row, its detokenizer, its admission) fails that request only; any
other exception inside the loop fails every pending request (nothing hangs) and the
loop goes on serving new ones. `stats()` is a bounded ring of one row per iteration.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import warnings
import weakref
from collections import deque
from typing import Any

import pandas as pd
import torch

from kit.beam_search import BeamSearch, check_beam_request
from kit.engine import Engine
from kit.executor_loop import StepLoop, needs_synchronous_step
from kit.iteration_stats import STATS_COLUMNS, DeviceClock
from kit.kv_cache import KVCacheManager
from kit.kv_cache_config import KvCacheConfig, num_kv_blocks
from kit.kv_cache_inspector import KVCacheInspector
from kit.logits_processors import LogitsPass
from kit.output_processor import OutputProcessor, RequestState
from kit.outputs import GenerationResult
from kit.request import GenerationRequest, RequestStatus
from kit.sampling import Sampler
from kit.scheduler import Scheduler, SchedulerConfig
from kit.speculative import Speculator

__all__ = ["Executor", "GenerationRequest", "GenerationResult", "KvCacheConfig", "STATS_COLUMNS",
           "needs_synchronous_step"]

_ids = itertools.count()

_EXIT_JOIN_S = 120.0  # at interpreter exit, wait this long for an iteration in progress to end
_LIVE: "weakref.WeakSet[Executor]" = weakref.WeakSet()  # loops that may still run


def _shutdown_live_executors() -> None:
    """atexit: join every loop still running (an LLM's finalizer stops its own; this covers executors
    made directly). NOTE: a loop still inside torch at interpreter teardown aborts the process (rc 134)."""
    for ex in list(_LIVE):
        ex.shutdown(timeout=_EXIT_JOIN_S)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # pending kernels end before the CUDA context is torn down


atexit.register(_shutdown_live_executors)

class Executor(StepLoop):
    """Runs an `Engine` over a stream of requests in a background thread.

    `build_config` (default: the engine's) gives every budget: batch size, tokens per step,
    input and sequence lengths, block size. `max_stats_rows` bounds `stats()` and the
    recorded block maps (TensorRT-LLM's `iter_stats_max_iterations`).
    """

    def __init__(self, engine: Engine, *, build_config: Any = None, kv_cache_config: KvCacheConfig | None = None,
                 tokenizer: Any = None, enable_chunked_prefill: bool = True, policy: Any = "guaranteed_no_evict",
                 record_kv_cache: bool = False, max_stats_rows: int = 1000, overlap: bool | None = None,
                 logits_pass: LogitsPass | None = None, speculator: Speculator | None = None) -> None:
        bc = build_config if build_config is not None else engine.build_config
        if bc is None:
            raise ValueError("Executor: build_config is required when the engine carries none")
        kvc = KvCacheConfig() if kv_cache_config is None else kv_cache_config
        if not isinstance(kvc, KvCacheConfig):
            raise TypeError(f"kv_cache_config must be a KvCacheConfig or None, got {type(kvc).__name__}")
        if overlap is not None and not isinstance(overlap, bool):
            raise TypeError(f"overlap must be True, False or None (on when the engine is on CUDA), got {overlap!r}")
        if not isinstance(max_stats_rows, int) or isinstance(max_stats_rows, bool) or max_stats_rows < 1:
            raise ValueError(f"max_stats_rows must be an int >= 1, got {max_stats_rows!r}")
        self.engine = engine
        self.build_config = bc
        self.tokenizer = tokenizer
        self.vocab_size = engine.config.vocab_size
        num_blocks = num_kv_blocks(kvc, bytes_per_token=engine.kv_bytes_per_token, block_size=bc.block_size,
                                   max_batch_size=bc.max_batch_size * bc.max_beam_width,  # each beam holds blocks
                                   max_seq_len=bc.max_seq_len, device=engine.device)
        self.kv_cache_manager = KVCacheManager(num_blocks, bc.block_size, kvc.enable_block_reuse,
                                               bytes_per_token=engine.kv_bytes_per_token)
        self.kv_cache = engine.allocate_kv_cache(num_blocks, bc.block_size)
        engine.capture_cuda_graphs(self.kv_cache)  # decode graphs over this pool (a no-op on the CPU)
        self.scheduler = Scheduler(SchedulerConfig.from_build_config(
            bc, enable_chunked_prefill=enable_chunked_prefill, policy=policy), self.kv_cache_manager)
        self.inspector = KVCacheInspector(self.kv_cache_manager)
        self.sampler = Sampler()
        self.logits_pass = logits_pass if logits_pass is not None else LogitsPass()  # processors, guided mask
        self.eos_token_ids = tuple(engine.config.eos_token_ids) or (
            (tokenizer.eos_token_id,) if tokenizer is not None and tokenizer.eos_token_id is not None else ())
        self.output_processor = OutputProcessor(tokenizer, self.eos_token_ids, bc.max_seq_len, engine.device,
                                                speculative=speculator is not None)
        self.beam_search = BeamSearch(self.kv_cache_manager, self.kv_cache, self.eos_token_ids, tokenizer)
        self.record_kv_cache = record_kv_cache
        self.speculator = speculator  # speculative decoding (kit/speculative/); None: plain decoding
        if speculator is not None:
            speculator.attach(self.scheduler)  # a draft KV pool like the target's; freed as requests finish
        self._stats: deque[dict[str, Any]] = deque(maxlen=max_stats_rows)
        self._kv_snapshots: deque[pd.DataFrame] = deque(maxlen=max_stats_rows)
        self._inflight: set[str] = set()  # ids submitted and not yet finished (guarded by the lock)
        self._inbox: list[tuple[GenerationRequest, GenerationResult]] = []
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False  # set under the lock when the loop has exited: submit refuses from then on
        self._iteration = 0
        self._t0 = time.monotonic()
        self.overlap = engine.device.type == "cuda" if overlap is None else overlap
        self.clock = DeviceClock(engine.device, self._t0)
        self._pending = None  # the step in flight (overlap): launched, its tokens not read yet
        self._last_device_end: float | None = None  # when the device ended the last step (None after idling)
        # NOTE: the thread holds the executor only, never an LLM, so an LLM can be collected (its
        # finalizer then shuts this loop down)
        self._thread = threading.Thread(target=self._loop, name="kit-executor", daemon=True)
        _LIVE.add(self)
        self._thread.start()

    # -------------------------------------------------------------------- API
    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError naming the bad value if this engine cannot serve `request`."""
        n, sp = len(request.prompt_token_ids), request.sampling_params
        bc = self.build_config
        if n == 0:
            raise ValueError("the prompt is empty: it needs at least one token")
        if n > bc.max_input_len:
            raise ValueError(f"prompt has {n} tokens, more than this engine's max_input_len={bc.max_input_len}")
        if n + sp.max_tokens > bc.max_seq_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({sp.max_tokens}) = {n + sp.max_tokens} exceeds "
                             f"max_seq_len={bc.max_seq_len}")
        cfg = self.scheduler.config
        if not cfg.enable_chunked_prefill and n > cfg.max_num_tokens:
            raise ValueError(f"prompt has {n} tokens but max_num_tokens={cfg.max_num_tokens} and chunked prefill is "
                             "off: enable chunked prefill or raise max_num_tokens")
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        sp.check_vocab(self.vocab_size)
        check_beam_request(request, bc.max_beam_width, cfg.policy)  # beam search (kit/beam_search.py)
        if sp.use_beam_search and self.speculator is not None:
            raise ValueError("use_beam_search=True cannot be combined with speculative decoding (this LLM has a "
                             "speculative_config), as in TensorRT-LLM")
        self.logits_pass.validate(sp)

    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Queue a request; raises TypeError / ValueError at once for one the engine cannot take."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"submit takes a GenerationRequest, got {type(request).__name__}")
        self.validate(request)
        if request.request_id is None:
            request.request_id = f"req-{next(_ids)}"
        result = GenerationResult(request.request_id, on_abandon=self.abort, prompt=request.prompt,
                                  prompt_token_ids=request.prompt_token_ids)
        with self._lock:
            if self._closed or self._stop:
                raise RuntimeError("the executor is shut down")
            if request.request_id in self._inflight:
                raise ValueError(f"request_id {request.request_id!r} is already in flight")
            self._inflight.add(request.request_id)
            self._inbox.append((request, result))
        self._wake.set()
        return result

    def abort(self, request_id: str) -> None:
        """Stop a request; its result finishes with finish_reason 'cancelled'. Unknown ids are ignored."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop and join its thread; requests still pending fail with RuntimeError."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                warnings.warn(f"the executor loop did not stop within {timeout} s (an iteration is still "
                              "running); it stops after that iteration", stacklevel=2)
        if not self._thread.is_alive():
            _LIVE.discard(self)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_inflight(self) -> int:
        """Requests submitted and not finished yet."""
        with self._lock:
            return len(self._inflight)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def stats(self) -> pd.DataFrame:
        """One row per iteration (the last `max_stats_rows`). Columns: `iteration, time_s, duration_ms,
        request_ids, num_prefill_tokens, num_decode_tokens, batch_size, kv_blocks_used, kv_blocks_total,
        num_preemptions, preempted_request_ids, num_waiting, num_draft_tokens, num_accepted_draft_tokens`, then
        where the time went (kit/iteration_stats.py: `schedule_ms, prepare_ms, forward_ms, sampling_ms,
        output_ms, device_idle_ms`, the `overlap` flag, and the start/end times of each lane).

        `kv_blocks_used` is what the iteration held while it ran (taken when it was
        scheduled); the recorded block maps (`kv_cache_history`) are taken after it, once
        finished requests have given their blocks back.
        """
        with self._lock:
            rows = list(self._stats)
        return pd.DataFrame(rows, columns=list(STATS_COLUMNS))

    def kv_cache_history(self) -> pd.DataFrame:
        """Block maps recorded after every iteration (`record_kv_cache=True`), with a `step` column."""
        with self._lock:
            snaps = list(self._kv_snapshots)
        return pd.concat(snaps, ignore_index=True) if snaps else pd.DataFrame()

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()
            self._kv_snapshots.clear()

    # ------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self._stop:
            try:
                self._drain_inbox()
                if not self.scheduler.has_unfinished():
                    if self._pending is not None:
                        self.flush()
                        continue
                    self._last_device_end = None  # idle from here on: not a gap of the loop
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self.step()
            except Exception as e:  # noqa: BLE001 - any failure must reach the callers, not hang them
                self._pending = None
                self._fail_all(e)
        with self._lock:
            self._closed = True
        self._fail_all(RuntimeError("the executor was shut down before this request finished"))

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for greq, result in inbox:
            try:  # NOTE: a request that cannot be admitted fails alone; the others go on
                # beam search (kit/beam_search.py): the request budgets for every beam
                self.scheduler.add_request(self.beam_search.add(greq, self.output_processor.add(greq, result)))
            except Exception as e:  # noqa: BLE001
                state = self.output_processor.states.get(greq.request_id)
                if state is not None:
                    self._fail(state, e)
                else:
                    self._forget(greq.request_id)
                    result.publish(None, e)
        for rid in aborts:
            state = self.output_processor.states.get(rid)
            if state is None:
                continue
            for sid in self.output_processor.live_request_ids(state):
                self.scheduler.finish(sid, RequestStatus.FINISHED_ABORTED)
                self.output_processor.end(sid, RequestStatus.FINISHED_ABORTED)
            self.beam_search.release(rid)  # beam search: the other beams' blocks
            self._publish(state, final=True)

    # ---------------------------------------------------------------- failure
    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._inflight.discard(request_id)

    def _fail(self, state: RequestState, error: BaseException) -> None:
        """End one request with `error`: free its blocks, raise the error from its result."""
        for sid in self.output_processor.live_request_ids(state):
            self.scheduler.finish(sid, RequestStatus.FINISHED_ERROR)
        self.beam_search.release(state.greq.request_id)  # beam search: the other beams' blocks
        self.output_processor.fail(state, error)
        self._forget(state.greq.request_id)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every pending request with `error` and return the scheduler to empty."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for greq, result in inbox:
            result.publish(None, error)
            self._forget(greq.request_id)
        for state in list(self.output_processor.states.values()):
            self._fail(state, error)

    def __repr__(self) -> str:
        return (f"Executor({self.engine.network.name!r}, blocks={self.kv_cache_manager.num_blocks}x"
                f"{self.kv_cache_manager.block_size}, {self.scheduler!r})")

    def _repr_html_(self) -> str:
        df = self.stats()
        summary = (f"<b>Executor</b> &middot; {self._iteration} iterations ({len(df)} kept) &middot; running "
                   f"{self.scheduler.num_running}, waiting {self.scheduler.num_waiting} &middot; thread "
                   f"{'alive' if self.is_alive else 'stopped'}")
        tail = df.tail(8).to_html(index=False, border=0) if len(df) else "<p><i>no iterations yet</i></p>"
        return f"<div>{summary}{tail}{self.inspector._repr_html_()}</div>"
