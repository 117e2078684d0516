"""kit: a notebook-first research kit for LLM inference.

The pipeline, one object per step (see README):

    ModelLoader -> LoadedModel -> [Quantizer] -> NetworkBuilder -> Network
        -> Builder(BuildConfig) -> Engine -> ProfiledEngine
    LLM -> Executor -> Scheduler + KVCacheManager -> Engine.forward -> Sampler -> RequestOutput
"""

from kit.builder import BuildCache, BuildConfig, Builder, build
from kit.config import ModelConfig
from kit.batch import ForwardBatch, KVCache, SequenceInput
from kit.engine import Engine
from kit.engine_dir import load_engine, save_engine
from kit.executor import Executor
from kit.kv_cache_config import KvCacheConfig
from kit.outputs import GenerationResult
from kit.request import GenerationRequest
from kit.kv_cache import KVCacheInspector, KVCacheManager
from kit.llm import LLM
from kit.llm_args import CudaGraphConfig
from kit.guided_decoding import GuidedDecodingParams
from kit.quantization import CalibConfig, QuantAlgo, QuantConfig
from kit.loader import LoadedModel, ModelLoader
from kit.network import Layer, Network, NetworkBuilder
from kit.outputs import CompletionOutput, RequestOutput
from kit.sampling import Sampler
from kit.sampling_params import BatchedLogitsProcessor, LogitsProcessor, SamplingParams
from kit.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, SchedulerPolicy
from kit.tokenizer import Tokenizer
from kit.version import __version__

__all__ = [
    "BatchedLogitsProcessor", "BuildCache", "BuildConfig", "Builder", "CalibConfig", "CompletionOutput",
    "CudaGraphConfig", "GuidedDecodingParams", "LogitsProcessor", "QuantAlgo", "QuantConfig", "Engine", "Executor", "ForwardBatch", "GenerationRequest",
    "GenerationResult", "KVCache", "KVCacheInspector", "KVCacheManager", "KvCacheConfig", "LLM", "Layer",
    "LoadedModel", "ModelConfig", "ModelLoader", "Network", "NetworkBuilder", "RequestOutput", "Sampler",
    "SamplingParams", "Scheduler", "SchedulerConfig", "SchedulerOutput", "SchedulerPolicy", "SequenceInput",
    "Tokenizer", "__version__", "build", "load_engine", "save_engine",
]
