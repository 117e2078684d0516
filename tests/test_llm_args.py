"""kit/llm_args.py: LLM keyword arguments validated, merged into the BuildConfig; mutable BuildConfig;
KvCacheConfig and CalibConfig fields (no model needed)."""

import pytest
import torch

from kit.build_config import BuildConfig
from kit.kv_cache_config import KvCacheConfig
from kit.llm_args import LLM_KWARGS, CudaGraphConfig, LlmArgs
from kit.quantization import CalibConfig, QuantConfig


def test_sizing_arguments_are_written_into_a_copy_of_the_build_config():
    bc = BuildConfig(max_batch_size=8, max_seq_len=512)
    args = LlmArgs.from_kwargs("m", build_config=bc, max_batch_size=4, max_seq_len=256, max_num_tokens=128,
                               dtype=torch.bfloat16, kv_cache_config=KvCacheConfig(tokens_per_block=8))
    got = args.build_config_to_use()
    assert (got.max_batch_size, got.max_seq_len, got.max_input_len, got.max_num_tokens) == (4, 256, 256, 128)
    assert got.dtype == "bfloat16" and got.block_size == 8
    assert (bc.max_batch_size, bc.max_seq_len) == (8, 512)  # the caller's object is not changed
    assert LlmArgs.from_kwargs("m").build_config_to_use() is None  # nothing asked: the engine's own config


def test_cuda_graph_config_none_turns_graphs_off():
    assert LlmArgs.from_kwargs("m", cuda_graph_config=None).build_config_to_use().use_cuda_graphs is False
    bc = LlmArgs.from_kwargs("m", max_batch_size=16, cuda_graph_config=CudaGraphConfig(max_batch_size=4))
    assert bc.build_config_to_use().cuda_graph_batch_sizes == (1, 2, 4)
    with pytest.raises(ValueError, match="CudaGraphConfig.batch_sizes"):
        CudaGraphConfig(batch_sizes=[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch_size": 0}, r"LLM\(max_batch_size=...\) must be an int >= 1"),
    ({"dtype": "int3"}, r"LLM\(dtype=...\) must be one of"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"scheduler_policy": "fifo"}, "scheduler_policy"),
    ({"trust_remote_code": "yes"}, "trust_remote_code"),
    ({"max_input_len": 4096}, r"max_input_len \(4096\) must be <= max_seq_len"),
    ({"quant_config": QuantConfig(), "quantization": "int8_wo"}, "not both"),
    ({"calib_config": CalibConfig()}, "needs quant_config"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlmArgs.from_kwargs("m", **kwargs).quantization_to_use()


def test_unknown_and_mistyped_arguments():
    with pytest.raises(TypeError, match="unexpected keyword argument.*tensor_parallel"):
        LlmArgs.from_kwargs("m", tensor_parallel_sizes=2)
    with pytest.raises(TypeError, match="kv_cache_config"):
        LlmArgs.from_kwargs("m", kv_cache_config={"max_tokens": 8})
    assert {"max_batch_size", "quant_config", "calib_config", "cuda_graph_config", "trust_remote_code"} <= set(LLM_KWARGS)


def test_build_config_is_mutable_and_validated_when_used():
    bc = BuildConfig(max_seq_len=256)
    assert bc.max_input_len == 256
    bc.max_seq_len = 128
    assert bc.max_input_len == 128  # an unset max_input_len follows max_seq_len
    bc.max_batch_size = 0
    with pytest.raises(ValueError, match="BuildConfig.max_batch_size must be an integer >= 1"):
        LlmArgs.from_kwargs("m", build_config=bc)
    assert BuildConfig(max_input_len=100, max_seq_len=200).replace(max_seq_len=400).max_input_len == 100


def test_kv_cache_and_calib_configs():
    assert KvCacheConfig(free_gpu_memory_fraction=None).free_gpu_memory_fraction == 0.9
    with pytest.raises(ValueError, match="host_cache_size"):
        KvCacheConfig(host_cache_size=1)
    assert KvCacheConfig(host_cache_size=0).host_cache_size == 0
    with pytest.raises(ValueError, match="tokens_per_block"):
        KvCacheConfig(tokens_per_block=0)
    qc = CalibConfig(calib_batches=4, calib_batch_size=2, calib_max_seq_length=64).apply(QuantConfig())
    assert (qc.calib_size, qc.calib_max_seq_len) == (8, 64)
