"""`LLM`: the high-level API, from a model name to generated text.

    llm = LLM("smollm2-135m")
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))
    print(out.text)

Behind it sit the stepwise objects a notebook can take apart: `llm.loaded`
(ModelLoader -> LoadedModel), `llm.network` (NetworkBuilder -> Network), `llm.engine`
(Builder -> Engine), and `llm.executor` (Executor: Scheduler + KVCacheManager + Sampler).
"""

from __future__ import annotations

import html
import time
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from kit.builder import BuildConfig, Builder
from kit.engine import Engine
from kit.executor import Executor, GenerationRequest, GenerationResult, KvCacheConfig
from kit.loader import LoadedModel, ModelLoader
from kit.outputs import CompletionOutput, RequestOutput
from kit.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "CompletionOutput", "SamplingParams", "BuildConfig", "KvCacheConfig"]

Prompt = str | Sequence[int]


class LLM:
    """Load, build and serve a model; `generate` many prompts at once with in-flight batching."""

    def __init__(self, model: str | LoadedModel | Engine, *, device: str | torch.device | None = None,
                 build_config: BuildConfig | None = None, kv_cache_config: KvCacheConfig | None = None,
                 enable_chunked_prefill: bool = True, enable_prefix_caching: bool | None = None,
                 scheduler_policy: str = "guaranteed_no_evict", quantization: Any = None, backend: str = "torch",
                 enable_build_cache: bool = True, skip_build_cache: bool = False,
                 record_kv_cache: bool = False) -> None:
        t0 = time.perf_counter()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if backend == "tensorrt":
            raise ValueError("LLM(backend='tensorrt'): the TensorRT backend builds and inspects plans "
                             "(kit.Builder('tensorrt').build(...), kit build --backend tensorrt) but cannot execute "
                             "them here; use backend='torch' to generate")
        self._loaded = model if isinstance(model, LoadedModel) else None
        self._model_ref = None  # set on a build-cache hit: where to load the model from if asked
        self.build_cache_hit = False
        if isinstance(model, Engine):
            engine = model
        else:
            engine = self._build(model, device, build_config, quantization, backend, enable_build_cache,
                                 skip_build_cache)
        if not getattr(engine.backend, "can_execute", engine.backend.name != "tensorrt"):
            raise ValueError(f"LLM: this engine's backend ({engine.backend.name}) builds and inspects plans but "
                             "cannot execute them; build the model with backend='torch' to generate")
        self.engine = engine
        self.build_config = build_config = engine.build_config or build_config or BuildConfig()
        self.tokenizer = engine.tokenizer if engine.tokenizer is not None else getattr(self._loaded, "tokenizer", None)
        kvc = kv_cache_config or KvCacheConfig()
        if enable_prefix_caching is not None:
            kvc = KvCacheConfig(kvc.free_gpu_memory_fraction, kvc.max_tokens, kvc.num_blocks, enable_prefix_caching)
        self.executor = Executor(
            engine, tokenizer=self.tokenizer, max_batch_size=build_config.max_batch_size,
            max_num_tokens=build_config.max_num_tokens, max_input_len=build_config.max_input_len,
            max_seq_len=build_config.max_seq_len, block_size=build_config.block_size,
            enable_chunked_prefill=enable_chunked_prefill, policy=scheduler_policy, kv_cache_config=kvc,
            record_kv_cache=record_kv_cache)
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
        return self.executor.kv_manager

    @property
    def kv_cache_inspector(self):
        return self.executor.inspector

    # --------------------------------------------------------------- generate
    def _request(self, prompt: Prompt, sp: SamplingParams, streaming: bool) -> GenerationRequest:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return GenerationRequest(self.tokenizer.encode(prompt), sp, prompt=prompt, streaming=streaming)
        ids = [int(t) for t in prompt]
        return GenerationRequest(ids, sp, prompt=None, streaming=streaming)

    def _requests(self, prompts: Prompt | Sequence[Prompt], sampling_params, streaming: bool):
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                              and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if not plist:
            raise ValueError("generate needs at least one prompt")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sps = [sampling_params or SamplingParams()] * len(plist)
        else:
            sps = list(sampling_params)
            if len(sps) != len(plist):
                raise ValueError(f"got {len(sps)} sampling_params for {len(plist)} prompts")
        reqs = [self._request(p, sp, streaming) for p, sp in zip(plist, sps)]
        for i, r in enumerate(reqs):  # refuse bad prompts before anything is queued
            try:
                self.executor._validate(r)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return single, reqs

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, streaming: bool = False) -> RequestOutput | list[RequestOutput] | Iterator[RequestOutput]:
        """Generate for one prompt (-> RequestOutput) or many (-> list, in order).

        `streaming=True` returns an iterator of snapshots of all requests as they advance;
        each snapshot's `outputs[0].text_diff` is the text added since that request's last one.
        """
        single, reqs = self._requests(prompts, sampling_params, streaming)
        results = [self.executor.submit(r) for r in reqs]
        if streaming:
            return _merge_streams(results)
        outs = []
        with tqdm(total=len(results), desc="generating", disable=not use_tqdm or len(results) < 2,
                  leave=False) as bar:
            for r in results:
                outs.append(r.result())
                bar.update(1)
        return outs[0] if single else outs

    def generate_async(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False) -> GenerationResult:
        """Submit one prompt; `await` the result, or `async for` its snapshots when streaming."""
        _, (req,) = self._requests([prompt] if not isinstance(prompt, str) else prompt, sampling_params, streaming)
        return self.executor.submit(req)

    def abort(self, request_id: str) -> None:
        self.executor.abort(request_id)

    # -------------------------------------------------------------- lifecycle
    def shutdown(self) -> None:
        self.executor.shutdown()

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


def _merge_streams(results: list[GenerationResult]) -> Iterator[RequestOutput]:
    """Snapshots of several requests in the order they are published."""
    seen = [0] * len(results)
    pending = set(range(len(results)))
    while pending:
        progressed = False
        for i in sorted(pending):
            r = results[i]
            history = r._history
            while seen[i] < len(history):
                yield history[seen[i]]
                seen[i] += 1
                progressed = True
            if r.done and seen[i] == len(r._history):
                if r._error is not None:
                    raise r._error
                pending.discard(i)
        if not progressed and pending:
            with results[min(pending)]._cond:
                results[min(pending)]._cond.wait(0.005)
