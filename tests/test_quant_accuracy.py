"""Quantization of the embedded SmolLM2 measured against the unquantized model.

The README's setting (`full`) is 2,048 held-out tokens and calibration on 8 x 128 tokens. The
W8A16 and SmoothQuant bounds are also checked on a `fast` size, 512 held-out tokens and
calibration on 4 x 64 tokens, where they held with a margin (measured: W8A16 +0.09 %, SmoothQuant
+1.67 %, W8A8 +3.78 %); their `full` run is `@pytest.mark.slow` (`pytest -m slow`). FP8 and the
int4 comparison run at the `full` size always: on 512 tokens FP8 measured +2.74 % (4 x 64
calibration) and +4.38 % (8 x 128) against its 3 % bound, and with the first 10 blocks quantized
AWQ lost to RTN (+4.10 % vs +3.52 %), so neither has a cheaper size that keeps its bound yet.

NOTE: SmolLM2's published weights were already 4-bit (GGUF Q4_1, embeddings Q8_0) before the kit
dequantized them. Requantizing them to another 4-bit grid stacks a second rounding on the first,
so the int4 rows below lose far more perplexity than int4 usually costs a model trained in bf16.
"""

from dataclasses import dataclass

import pytest
import torch

from kit.builder import BuildConfig, Builder
from kit.datasets import calibration_texts
from kit.engine import Engine
from kit.engine_dir import load_engine, save_engine
from kit.evaluation import eval_windows, logit_agreement, memory, perplexity
from kit.llm import LLM
from kit.network import NetworkBuilder
from kit.quantization import QuantConfig, Quantizer
from kit.sampling_params import SamplingParams


@dataclass(frozen=True)
class Sweep:
    """How big one accuracy sweep is."""

    num_tokens: int          # held-out tokens, in windows of 256
    calib_size: int          # calibration windows ...
    calib_max_seq_len: int   # ... of this many tokens


SWEEPS = {"fast": Sweep(512, 4, 64), "full": Sweep(2048, 8, 128)}
SIZES = ["fast", pytest.param("full", marks=pytest.mark.slow)]


class Accuracy:
    """The reference engine and, per sweep size, its held-out windows and perplexity (made once)."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.ref = Engine.from_network(NetworkBuilder(loaded).build())
        self._eval: dict[int, tuple[list, float]] = {}

    def windows(self, num_tokens: int) -> tuple[list, float]:
        if num_tokens not in self._eval:
            windows = eval_windows(self.loaded.tokenizer, num_tokens=num_tokens, window=256)
            self._eval[num_tokens] = windows, perplexity(self.ref, windows)
        return self._eval[num_tokens]

    def increase(self, sweep: Sweep, name: str, **kw) -> tuple[float, Engine]:
        """Perplexity increase in percent of preset `name` under `sweep`, and its engine."""
        windows, base = self.windows(sweep.num_tokens)
        qc = QuantConfig.from_name(name, calib_size=sweep.calib_size, calib_max_seq_len=sweep.calib_max_seq_len, **kw)
        q = Quantizer(qc).quantize(self.loaded, calibration_texts(), progress=False)
        engine = Engine.from_network(NetworkBuilder(q).build())
        return 100.0 * (perplexity(engine, windows) / base - 1.0), engine


@pytest.fixture(scope="session")
def accuracy(smollm2):
    return Accuracy(smollm2)


@pytest.mark.parametrize("size", SIZES)
def test_w8a16_within_1pct_and_smoothquant_within_5pct_and_better_than_w8a8(accuracy, size):
    sweep = SWEEPS[size]
    w8a16, eng = accuracy.increase(sweep, "int8_wo")
    sq, _ = accuracy.increase(sweep, "int8_sq")
    w8a8, _ = accuracy.increase(sweep, "w8a8")
    print(f"[{size}] ppl increase: W8A16 {w8a16:.2f}%  SmoothQuant {sq:.2f}%  W8A8 {w8a8:.2f}%")
    assert w8a16 <= 1.0
    assert sq <= 5.0 and sq < w8a8
    # W8A16 halves the linear layers' float bytes: fp32 here, so a quarter of fp32 = half of bf16
    ref_mem, q_mem = memory(accuracy.ref), memory(eng)
    bf16_linear = ref_mem["linear_weight_mib"] / 2
    assert 0.45 < q_mem["linear_weight_mib"] / bf16_linear < 0.55


def test_fp8_within_3pct(accuracy):
    fp8, _ = accuracy.increase(SWEEPS["full"], "fp8")
    print(f"ppl increase: FP8 {fp8:.2f}%")
    assert fp8 <= 3.0


def test_awq_and_gptq_beat_rtn_at_the_same_group_size(accuracy):
    sweep = SWEEPS["full"]
    rtn, rtn_engine = accuracy.increase(sweep, "int4_wo", group_size=64)
    awq, _ = accuracy.increase(sweep, "int4_awq", group_size=64)
    gptq, _ = accuracy.increase(sweep, "int4_gptq", group_size=64)
    print(f"ppl increase (group 64; weights were Q4_1 already): RTN {rtn:.1f}%  AWQ {awq:.1f}%  GPTQ {gptq:.1f}%")
    assert awq < rtn and gptq < rtn
    # int4: a quarter of bf16 plus one fp16 scale per 64 weights
    ratio = memory(rtn_engine)["linear_weight_mib"] / (memory(accuracy.ref)["linear_weight_mib"] / 2)
    assert 0.25 < ratio < 0.25 + 2 / 64 + 0.01


def test_quantized_kv_cache(accuracy):
    loaded, ref = accuracy.loaded, accuracy.ref
    windows, _ = accuracy.windows(SWEEPS["fast"].num_tokens)
    for algo in ("INT8", "FP8"):
        q = Quantizer(QuantConfig(quant_algo="NO_QUANT", kv_cache_quant_algo=algo)).quantize(loaded, progress=False)
        engine = Engine.from_network(NetworkBuilder(q).build())
        kv = engine.allocate_kv_cache(2, 16)
        assert kv.is_quantized and kv.k.element_size() == 1 and kv.k_scale.shape == kv.k.shape[:-1]
        assert engine.kv_bytes_per_token == 2 * 30 * (192 + 4 * 3)  # 1 byte a value + a scale per head
        assert abs(perplexity(engine, windows[:2]) / perplexity(ref, windows[:2]) - 1) < 0.01
        agree = logit_agreement(ref, engine, windows[:1])
        assert agree["top1_agreement"] > 0.95


def test_llm_routes_quantization_and_fits_the_group_size(smollm2):
    bc = BuildConfig(max_batch_size=2, max_seq_len=128, max_input_len=64, max_num_tokens=128)
    with LLM(smollm2, device="cpu", build_config=bc, quantization="int8_wo") as llm:
        assert llm.network.quant_config.quant_algo.value == "W8A16"
        text = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0)).text
        assert "Paris" in text
    with LLM(smollm2, device="cpu", build_config=bc, quantization="int4_wo") as llm:
        assert llm.network.quant_config.group_size == 64  # 576 = 9 x 64: 128 does not divide it
    with pytest.raises(ValueError, match="quantization"):
        LLM(smollm2, device="cpu", build_config=bc, quantization="int3")


def test_quantized_engine_round_trips_through_its_directory(accuracy, tmp_path):
    from helpers import run_chunks

    loaded = accuracy.loaded
    q = Quantizer(QuantConfig.from_name("fp8_pc_pt")).quantize(loaded, progress=False)
    engine = Builder("torch", device="cpu").build(NetworkBuilder(q).build(), BuildConfig(max_seq_len=64,
                                                  max_input_len=32, max_batch_size=2), loaded=q,
                                                  enable_build_cache=False, progress=False)
    again = load_engine(save_engine(engine, tmp_path / "fp8"))
    assert any(t.dtype == torch.float8_e4m3fn for t in again.network.weights.values())
    seqs, sched = [[5, 6, 7, 8, 9]], [[5]]
    assert torch.equal(run_chunks(engine, seqs, sched, 4)[0], run_chunks(again, seqs, sched, 4)[0])
    moved = q.to(dtype=torch.bfloat16)  # casting a quantized model leaves its quantized parts alone
    assert all(moved.weights[k].dtype == v.dtype for k, v in q.weights.items() if not k.endswith((".weight", ".bias")))
