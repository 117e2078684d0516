"""kit/roofline.py: the bytes and FLOPs of a decode step counted from the shapes, and the roofline row."""

import pytest

from kit.config import ModelConfig
from kit.loader import SYNTHETIC_PRESETS
from kit.quantization.config import QuantConfig
from kit.roofline import H100_COPY_BANDWIDTH, StepCost, decode_step_cost, describe_row, roofline_row

CFG = ModelConfig(family="llama", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_bytes_and_flops_follow_the_shapes_exactly():
    c = CFG
    linear = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 96  # per block: qkv, o, gate/up/down
    cost = decode_step_cost(c, batch=3, context=10)
    assert cost.weight_bytes == 2 * (2 * (linear + 2 * 64) + 64 + 100 * 64 + 3 * 64)  # + norms, final norm, head, 3 rows
    assert cost.kv_read_bytes == 3 * 10 * 2 * 32 * 2 * 2 and cost.kv_write_bytes == 3 * 2 * 32 * 2 * 2
    assert cost.activation_bytes == 3 * (2 * (12 * 64 + 5 * 64 + 4 * 32 + 6 * 96) + 100) * 2
    assert cost.flops == 2.0 * 3 * (2 * linear + 100 * 64) + 4.0 * 3 * 10 * 2 * 64
    assert cost.total_bytes == cost.weight_bytes + cost.kv_read_bytes + cost.kv_write_bytes + cost.activation_bytes
    assert cost.roofline_ms(1e9) == pytest.approx(1e3 * cost.total_bytes / 1e9, rel=1e-12)  # bandwidth bound at batch 3


def test_quantization_and_an_8bit_cache_shrink_the_bytes():
    c = CFG
    bf16 = decode_step_cost(c, 1, 100)
    fp8 = decode_step_cost(c, 1, 100, quantization="FP8")
    w4 = decode_step_cost(c, 1, 100, quantization="W4A16_AWQ")
    head_and_rest = 100 * 64 * 2 + 2 * 2 * 64 * 2 + 64 * 2 + 64 * 2  # head, norms, final norm, one embedding row
    linear = bf16.weight_bytes - head_and_rest
    assert fp8.weight_bytes - head_and_rest == linear / 2 and w4.weight_bytes - head_and_rest == linear * 4.25 / 16
    int8_kv = decode_step_cost(c, 1, 100, kv_cache_dtype="int8")
    assert int8_kv.kv_read_bytes == 100 * (2 * 32 * 2 + 2 * 4 * 2 * 2)  # values at 1 byte, a float32 scale per head
    assert decode_step_cost(c, 1, 100, quantization="fp8") == fp8  # a preset name
    assert decode_step_cost(c, 1, 100, quantization="int4_awq") == w4
    qc = QuantConfig.from_name("fp8", kv_cache_quant_algo="int8")
    assert decode_step_cost(c, 1, 100, quantization=qc) == decode_step_cost(c, 1, 100, quantization="FP8",
                                                                            kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="quantization must be"):
        decode_step_cost(c, 1, 100, quantization="INT3")
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        decode_step_cost(c, 1, 100, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="batch and context"):
        decode_step_cost(c, 0, 100)


def test_llama_1b_step_reads_its_weights_once():
    """The issue's numbers: Llama-3.2-1B bf16 moves ~2.47 GB a step: 0.82 ms at 3.0 TB/s."""
    c = ModelConfig(**SYNTHETIC_PRESETS["llama-3.2-1b"])
    row = roofline_row(c, 1, 256, step_ms=1.92)
    assert round(row["weight_bytes"] / 1e9, 2) == 2.47 and round(row["roofline_ms"], 2) == 0.83
    assert row["roofline_fraction"] == row["roofline_ms"] / 1.92
    assert row["achieved_tb_s"] == pytest.approx(row["bytes_per_step"] / 1.92e-3 / 1e12)
    assert row["bandwidth_tb_s"] == H100_COPY_BANDWIDTH / 1e12
    assert "% of roofline" in describe_row(row) and "step_ms" not in roofline_row(c, 1, 256)
    with pytest.raises(ValueError, match="step_ms must be > 0"):
        roofline_row(c, 1, 256, step_ms=0)


def test_large_batches_become_compute_bound():
    c = ModelConfig(**SYNTHETIC_PRESETS["llama-3.1-8b"])
    small, large = decode_step_cost(c, 1, 256), decode_step_cost(c, 4096, 256)
    assert small.roofline_ms() == pytest.approx(1e3 * small.total_bytes / H100_COPY_BANDWIDTH, rel=1e-12)
    assert large.roofline_ms() == pytest.approx(1e3 * large.flops / 790e12, rel=1e-12)  # past the ridge: FLOPs bind
    assert isinstance(small, StepCost) and "StepCost" in small._repr_html_()
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        small.roofline_ms(0)
