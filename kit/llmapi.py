"""TensorRT-LLM's `tensorrt_llm.llmapi` names, from the kit: `from kit.llmapi import LLM, KvCacheConfig, ...`.

Nothing is defined here; each name lives in the module that owns it (README: the LLM API).
"""

from kit.build_config import BuildConfig
from kit.guided_decoding import GuidedDecodingParams
from kit.kv_cache_config import KvCacheConfig
from kit.llm import LLM
from kit.llm_args import CudaGraphConfig
from kit.outputs import CompletionOutput, GenerationResult, Logprob, RequestOutput
from kit.quantization import CalibConfig, QuantAlgo, QuantConfig
from kit.sampling_params import BatchedLogitsProcessor, LogitsProcessor, SamplingParams

__all__ = ["LLM", "BuildConfig", "CalibConfig", "CompletionOutput", "CudaGraphConfig", "GenerationResult",
           "GuidedDecodingParams", "KvCacheConfig", "Logprob", "LogitsProcessor", "BatchedLogitsProcessor",
           "QuantAlgo", "QuantConfig", "RequestOutput", "SamplingParams"]
