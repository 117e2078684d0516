"""`LLM`: the high-level API, from a model name to generated text.

    llm = LLM("smollm2-135m")
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    print(out.text)

`LLM(model, **kwargs)` takes TensorRT-LLM's keyword arguments (validated in kit/llm_args.py:
sizing such as `max_batch_size=`, `max_seq_len=`, `dtype=`, and `kv_cache_config=`,
`build_config=`, `quant_config=`, `calib_config=`, `cuda_graph_config=`,
`guided_decoding_backend=`, `batched_logits_processor=`); prompts are a str, token ids, or a
`{"prompt": ...}` / `{"prompt_token_ids": ...}` dict, or a list of those.

Behind it sit the stepwise objects a notebook can take apart: `llm.loaded`
(ModelLoader -> LoadedModel), `llm.network` (NetworkBuilder -> Network), `llm.engine`
(Builder -> Engine), and `llm.executor` (Executor: Scheduler + KVCacheManager + Sampler).
"""

from __future__ import annotations

import html
import os
import time
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import torch
from kit.progress import tqdm

from kit.builder import BuildConfig, Builder
from kit.engine import Engine
from kit.engine_dir import save_engine
from kit.executor import Executor
from kit.guided_decoding import GuidedDecoder
from kit.kv_cache_config import KvCacheConfig
from kit.kv_cache_events import KVCacheEventRing
from kit.llm_args import LlmArgs
from kit.loader import LoadedModel, ModelLoader
from kit.logits_processors import LogitsPass
from kit.outputs import CompletionOutput, GenerationResult, RequestOutput
from kit.parallel import DistributedEngine, build_parallel_engine, check_parallel_sizes
from kit.request import GenerationRequest, prompt_token_ids_of
from kit.sampling_params import SamplingParams
from kit.speculative import DraftModelDrafter, DraftTargetDecodingConfig, NGramDecodingConfig, NGramDrafter, Speculator
from kit.tokenizer import Tokenizer

__all__ = ["LLM", "RequestOutput", "CompletionOutput", "SamplingParams", "BuildConfig", "KvCacheConfig"]

Prompt = str | Sequence[int] | dict[str, Any]


class LLM:
    """Load, build and serve a model; `generate` many prompts at once with in-flight batching."""

    def __init__(self, model: str | LoadedModel | Engine, **kwargs: Any) -> None:
        """`model`: a registered name (`"smollm2-135m"`), a Hugging Face directory, a .gguf file, a kit
        engine directory (`LLM.save`), a LoadedModel or an Engine. Keyword arguments: kit/llm_args.py."""
        t0 = time.perf_counter()
        self.args = args = LlmArgs.from_kwargs(model, **kwargs)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_parallel_sizes(args.tensor_parallel_size, args.pipeline_parallel_size, device)  # before anything
        if args.backend == "tensorrt":
            raise ValueError("LLM(backend='tensorrt'): the TensorRT backend builds and inspects plans "
                             "(kit.Builder('tensorrt').build(...), kit build --backend tensorrt) but cannot execute "
                             "them here; use backend='torch' to generate")
        self._loaded = model if isinstance(model, LoadedModel) else None
        self._model_ref = None  # set on a build-cache hit: where to load the model from if asked
        self.build_cache_hit = False
        build_config = args.build_config_to_use()
        if isinstance(model, Engine):
            engine = model
        elif args.tensor_parallel_size > 1:  # kit/parallel: ranks 1..N-1 in their own processes
            engine = self._build_parallel(model, device, build_config, args.quantization_to_use(),
                                          args.tensor_parallel_size, args.enable_build_cache, args.skip_build_cache)
        else:
            engine = self._build(model, device, build_config, args.quantization_to_use(), args.backend,
                                 args.enable_build_cache, args.skip_build_cache)
        if not getattr(engine.backend, "can_execute", engine.backend.name != "tensorrt"):
            raise ValueError(f"LLM: this engine's backend ({engine.backend.name}) builds and inspects plans but "
                             "cannot execute them; build the model with backend='torch' to generate")
        self.engine = engine
        self.build_config = build_config = engine.build_config or build_config or BuildConfig()
        self.tokenizer = _tokenizer(args.tokenizer) if args.tokenizer is not None else (
            engine.tokenizer if engine.tokenizer is not None else getattr(self._loaded, "tokenizer", None))
        guided = None
        if args.guided_decoding_backend is not None:
            if self.tokenizer is None:
                raise ValueError("LLM(guided_decoding_backend=...) needs a tokenizer: this model has none")
            guided = GuidedDecoder(self.tokenizer.hf, engine.config.vocab_size,
                                   tuple(engine.config.eos_token_ids) or (self.tokenizer.eos_token_id,),
                                   args.guided_decoding_backend)
        self.speculative_config = args.speculative_config
        speculator = None if args.speculative_config is None else self._speculator(args.speculative_config,
                                                                                    args.backend)
        try:
            self.executor = Executor(engine, build_config=build_config, kv_cache_config=args.kv_cache_config_to_use(),
                                     tokenizer=self.tokenizer, enable_chunked_prefill=args.enable_chunked_prefill,
                                     policy=args.scheduler_policy, record_kv_cache=args.record_kv_cache,
                                     max_stats_rows=args.max_stats_rows, overlap=args.overlap,
                                     logits_pass=LogitsPass(args.batched_logits_processor, guided),
                                     speculator=speculator)
        except BaseException:
            if isinstance(engine, DistributedEngine):
                engine.shutdown()
            raise
        kvc = args.kv_cache_config_to_use()
        if kvc.event_buffer_max_size:
            mgr = self.executor.kv_cache_manager
            mgr.events = KVCacheEventRing(kvc.event_buffer_max_size, mgr.num_blocks, build_config.max_seq_len)
        self._stats_seen = 0  # iterations already returned by get_stats
        # NOTE: the finalizer holds the executor, not the LLM: dropping the LLM without shutdown()
        # stops the loop and its thread; it also runs at interpreter exit (the atexit hook)
        self._finalizer = weakref.finalize(self, _shutdown, self.executor, engine)
        self.startup_seconds = time.perf_counter() - t0

    def _build(self, model, device, build_config, quantization, backend, enable_build_cache, skip_build_cache):
        """Ask the builder once for an engine for this model and config (engine dir, build cache or build)."""
        result = Builder(backend, device=device).get_engine(
            model, build_config, quantization=quantization, enable_build_cache=enable_build_cache,
            skip_build_cache=skip_build_cache)
        self.build_cache_hit = result.cache_hit
        if result.cache_hit and quantization is None:
            self._model_ref = model  # the model is loaded on first access to `llm.loaded`
        if result.loaded is not None:
            self.loaded = result.loaded
        return result.engine

    def _build_parallel(self, model, device, build_config, quantization, tp, enable_build_cache, skip_build_cache):
        result = build_parallel_engine(model, tp, device=device, build_config=build_config, quantization=quantization,
                                       enable_build_cache=enable_build_cache, skip_build_cache=skip_build_cache)
        self.build_cache_hit = result.cache_hit
        if result.loaded is not None:
            self.loaded = result.loaded
        return result.engine

    def _speculator(self, config: Any, backend: str) -> Speculator:
        """Speculative decoding (TensorRT-LLM's `speculative_config=`): an n-gram or a draft-model drafter."""
        if isinstance(config, NGramDecodingConfig):
            return Speculator(config, NGramDrafter(config))
        if not isinstance(config, DraftTargetDecodingConfig):
            raise TypeError(f"speculative_config must be a DraftTargetDecodingConfig or an NGramDecodingConfig, got "
                            f"{type(config).__name__}")
        draft = config.speculative_model_dir
        if not isinstance(draft, Engine):  # a name, a path or a LoadedModel: built like the target (build cache)
            draft = Builder(backend, device=self.engine.device).get_engine(
                draft, self.build_config, quantization=config.speculative_model_quantization, progress=False).engine
        if draft.config.vocab_size != self.engine.config.vocab_size:
            raise ValueError(f"DraftTargetDecodingConfig.speculative_model_dir: the draft's vocabulary has "
                             f"{draft.config.vocab_size} tokens, the target's {self.engine.config.vocab_size}; they must "
                             "share one vocabulary")
        return Speculator(config, DraftModelDrafter(draft, config.max_draft_len))

    # -------------------------------------------------------------- properties
    @property
    def loaded(self) -> LoadedModel | None:
        """The LoadedModel behind the engine; after a build-cache hit it is loaded on first access."""
        if self._loaded is None and self._model_ref is not None:
            self._loaded = ModelLoader(self._model_ref, device=self.engine.device, dtype=self.engine.dtype).load()
        return self._loaded

    @loaded.setter
    def loaded(self, value: LoadedModel | None) -> None:
        self._loaded = value

    @property
    def network(self):
        return self.engine.network

    @property
    def kv_cache_manager(self):
        return self.executor.kv_cache_manager

    @property
    def kv_cache_inspector(self):
        return self.executor.inspector

    # --------------------------------------------------------------- generate
    def _request(self, prompt: Any, sp: Any, streaming: bool) -> GenerationRequest:
        if isinstance(prompt, dict):  # TensorRT-LLM's prompt dicts
            keys = set(prompt) & {"prompt", "prompt_token_ids"}
            if len(keys) != 1:
                raise TypeError(f"a prompt dict must hold exactly one of 'prompt' (a str) or 'prompt_token_ids' "
                                f"(token ids), got the keys {sorted(prompt)}")
            prompt = prompt["prompt"] if "prompt" in keys else prompt_token_ids_of(prompt["prompt_token_ids"],
                                                                                   "prompt_token_ids")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            add = sp.add_special_tokens if isinstance(sp, SamplingParams) else True
            return GenerationRequest(self.tokenizer.encode(prompt, add_special_tokens=add), sp, prompt=prompt,
                                     streaming=streaming)
        return GenerationRequest(prompt_token_ids_of(prompt), sp, prompt=None, streaming=streaming)

    def _requests(self, prompts: Any, sampling_params: Any, streaming: bool,
                  single: bool) -> list[GenerationRequest]:
        """Requests for `prompts`, every one validated before anything is queued."""
        plist = [prompts] if single else prompts
        if not plist:
            raise ValueError("prompts must hold at least one prompt, got an empty list")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sps = [sampling_params or SamplingParams()] * len(plist)
        elif isinstance(sampling_params, (list, tuple)):
            sps = list(sampling_params)
            if len(sps) != len(plist):
                raise ValueError(f"sampling_params: got {len(sps)} for {len(plist)} prompts")
        else:
            raise TypeError(f"sampling_params must be a SamplingParams, a list of them, or None, got "
                            f"{type(sampling_params).__name__} (build one: SamplingParams(max_tokens=...))")
        reqs = []
        for i, (p, sp) in enumerate(zip(plist, sps)):
            try:
                r = self._request(p, sp, streaming)
                self.executor.validate(r)
            except (TypeError, ValueError) as e:
                if single:
                    raise
                raise type(e)(f"prompt {i}: {e}") from None
            reqs.append(r)
        return reqs

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, streaming: bool = False) -> RequestOutput | list[RequestOutput] | Iterator[RequestOutput]:
        """Generate for one prompt (-> RequestOutput) or many (-> list, in order).

        One prompt is a str, a list of int token ids or a 1-D integer numpy array; many is
        a list of those. `streaming=True` returns an iterator of snapshots of all requests as
        they advance; each snapshot's `outputs[0].text_diff` is the text added since that
        request's last one. Closing that iterator early (break, an exception) aborts the
        requests still running.
        """
        single = _is_single_prompt(prompts)
        results = [self.executor.submit(r) for r in self._requests(prompts, sampling_params, streaming, single)]
        if streaming:
            return _merge_streams(results, self.executor.abort)
        outs = []
        try:
            with tqdm(total=len(results), desc="generating", disable=not use_tqdm or len(results) < 2,
                      leave=False) as bar:
                for r in results:
                    outs.append(r.result())
                    bar.update(1)
        except BaseException:  # KeyboardInterrupt, a failed request: nobody waits for the others any more
            for r in results:
                if not r.done:
                    self.executor.abort(r.request_id)
            raise
        return outs[0] if single else outs

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> GenerationResult:
        """Submit one prompt (as in `generate`); `await` the result, or `async for` its snapshots.

        Cancelling the awaiting task, or closing the `async for`, aborts the request."""
        if not _is_single_prompt(prompt):
            raise TypeError(f"generate_async takes one prompt (a str, a list of int token ids or a 1-D integer "
                            f"numpy array), got {type(prompt).__name__}: submit a batch with generate()")
        (req,) = self._requests(prompt, sampling_params, streaming, single=True)
        return self.executor.submit(req)

    def abort(self, request_id: str) -> None:
        self.executor.abort(request_id)

    # ------------------------------------------------------------ inspection
    def get_stats(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Iteration statistics since the last call, as TensorRT-LLM's dicts (one per iteration):
        `iter`, `iterLatencyMS`, `numActiveRequests`, `numQueuedRequests`, `maxNumActiveRequests`,
        `inflightBatchingStats` {numScheduledRequests, numContextRequests, numGenRequests, numCtxTokens,
        numPausedRequests}, `kvCacheStats` {maxNumBlocks, freeNumBlocks, usedNumBlocks, tokensPerBlock}.
        Waits up to `timeout` s for a first new iteration."""
        deadline = time.monotonic() + timeout
        while True:
            df = self.executor.stats()
            new = df[df["iteration"] > self._stats_seen]
            if len(new) or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if len(new):
            self._stats_seen = int(new["iteration"].max())
        bc = self.build_config
        return [{
            "iter": int(r.iteration), "iterLatencyMS": float(r.duration_ms), "timestamp": float(r.time_s),
            "numActiveRequests": int(r.batch_size), "numQueuedRequests": int(r.num_waiting),
            "maxNumActiveRequests": bc.max_batch_size,
            "inflightBatchingStats": {
                "numScheduledRequests": int(r.batch_size), "numGenRequests": int(r.num_decode_tokens),
                "numContextRequests": int(r.batch_size - r.num_decode_tokens),
                "numCtxTokens": int(r.num_prefill_tokens), "numPausedRequests": int(r.num_preemptions)},
            "kvCacheStats": {
                "maxNumBlocks": int(r.kv_blocks_total), "usedNumBlocks": int(r.kv_blocks_used),
                "freeNumBlocks": int(r.kv_blocks_total - r.kv_blocks_used), "tokensPerBlock": bc.block_size},
        } for r in new.itertuples()]

    def get_kv_cache_events(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """KV-cache events since the last call (needs KvCacheConfig(event_buffer_max_size > 0)), as TensorRT-LLM's
        dicts: {"event_id", "data": {"type": "created" | "stored" | "removed", ...}, "window_size"}."""
        events = self.executor.kv_cache_manager.events
        if events is None:
            raise ValueError("KV-cache events are off: pass LLM(kv_cache_config=KvCacheConfig(event_buffer_max_size=N, "
                             "enable_block_reuse=True)) to record them")
        return events.pop(timeout)

    def save(self, engine_dir: str | os.PathLike) -> Path:
        """Write the engine (weights, configs, tokenizer) to `engine_dir`; `LLM(engine_dir)` loads it back."""
        return save_engine(self.engine, engine_dir)

    # -------------------------------------------------------------- lifecycle
    def shutdown(self) -> None:
        """Stop the executor's loop and join its thread (also done when the LLM is collected, and at exit)."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"LLM({self.network.name!r}, {self.engine!r}, {self.executor!r})"

    def _repr_html_(self) -> str:
        bc = self.build_config
        return (f"<b>LLM</b> <code>{html.escape(self.network.name)}</code> &middot; started in "
                f"{self.startup_seconds:.2f} s &middot; max_batch_size {bc.max_batch_size}, max_num_tokens "
                f"{bc.max_num_tokens}, max_seq_len {bc.max_seq_len}<br>{self.engine._repr_html_()}"
                f"{self.executor._repr_html_()}")


def _shutdown(executor: Executor, engine: Engine) -> None:
    """Stop the loop, then (tensor parallel) every rank's process."""
    executor.shutdown()
    if isinstance(engine, DistributedEngine):
        engine.shutdown()


def _is_single_prompt(prompts: Any) -> bool:
    """A str, bytes, a dict, a numpy array or a list whose first item is not itself a prompt: one prompt.

    bytes count as one prompt so that they are refused by name (not read as token ids)."""
    if isinstance(prompts, (str, bytes, bytearray, np.ndarray, dict)):
        return True
    if isinstance(prompts, (list, tuple)):
        return bool(prompts) and not isinstance(prompts[0], (str, bytes, list, tuple, np.ndarray, dict))
    return True  # anything else is one (bad) prompt, refused with its type named


def _tokenizer(value: Any) -> Tokenizer:
    """LLM(tokenizer=...): a kit Tokenizer, a Hugging Face tokenizer, or a directory holding one."""
    if isinstance(value, Tokenizer):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Tokenizer.from_dir(value)
    if hasattr(value, "encode") and hasattr(value, "decode"):
        return Tokenizer(value)
    raise TypeError(f"LLM(tokenizer=...) must be a directory, a kit Tokenizer or a Hugging Face tokenizer, got "
                    f"{type(value).__name__}")


def _merge_streams(results: list[GenerationResult], abort: Any) -> Iterator[RequestOutput]:
    """Snapshots of several requests in the order they are published; closing it aborts the rest."""
    seen = [0] * len(results)
    pending = set(range(len(results)))
    try:
        while pending:
            progressed = False
            for i in sorted(pending):
                r = results[i]
                done = r.done
                for snap in r.snapshots(seen[i]):
                    seen[i] += 1
                    progressed = True
                    yield snap
                if done and not r.snapshots(seen[i]):
                    if r.error is not None:
                        raise r.error
                    pending.discard(i)
            if not progressed and pending:
                results[min(pending)].wait(0.005)
    finally:
        for r in results:
            if not r.done:
                abort(r.request_id)
