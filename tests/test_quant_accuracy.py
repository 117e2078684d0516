"""Quantization of the embedded SmolLM2 measured against the unquantized model.

The README's setting (`full`) is 2,048 held-out tokens and calibration on 8 x 128 tokens: notebook
05's comparison of its eight schemes. The `full` tests are `@pytest.mark.slow` (`make test-slow`,
which CI runs after `make test`, and which runs notebook 05 after them). They read the rows of
`Accuracy.comparison`, which makes exactly the notebook's comparison (same schemes in the same order,
same calibration, same windows), so its quantized models and its rows are the build-cache entries
the notebook then reads (`test_the_comparison_is_notebook_05s` keeps the two in step). Each `full`
bound has an always-run version on a `fast` size, 512 held-out tokens and calibration on 4 x 64
tokens: W8A16 and SmoothQuant keep their bounds there with a margin (measured: W8A16 +0.09 %,
SmoothQuant +1.67 %, W8A8 +3.78 %); FP8 measured +2.74 % there against its 3 % bound (+4.38 % with
8 x 128 calibration), so the fast version checks 5 %; and with the first 10 blocks quantized AWQ
lost to RTN (+4.10 % vs +3.52 %), so the fast int4 version checks RTN's size and cost only.

NOTE: SmolLM2's published weights were already 4-bit (GGUF Q4_1, embeddings Q8_0) before the kit
dequantized them. Requantizing them to another 4-bit grid stacks a second rounding on the first,
so the int4 rows below lose far more perplexity than int4 usually costs a model trained in bf16.
"""

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kit.builder import BuildConfig, Builder
from kit.datasets import calibration_texts
from kit.engine import Engine
from kit.engine_dir import load_engine, save_engine
from kit.evaluation import compare, eval_windows, logit_agreement, memory, perplexity
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
# notebook 05's schemes, in its order, with its overrides (its calibration is SWEEPS["full"]'s)
NOTEBOOK_SCHEMES = {"int8_wo": {}, "fp8": {}, "fp8_pc_pt": {}, "w8a8": {}, "int8_sq": {},
                    "int4_wo": {"group_size": 64}, "int4_awq": {"group_size": 64}, "int4_gptq": {"group_size": 64}}
NOTEBOOK_05 = Path(__file__).resolve().parent.parent / "notebooks" / "05_quantization.ipynb"


class Accuracy:
    """The reference engine and, per sweep size, its held-out windows and perplexity (made once)."""

    def __init__(self, loaded, quantized):
        self.loaded = loaded
        self.quantized = quantized  # the session's quantize-once factory (tests/conftest.py)
        self.ref = Engine.from_network(NetworkBuilder(loaded).build())
        self._eval: dict[int, tuple[list, float]] = {}
        self._comparison = None

    def windows(self, num_tokens: int) -> tuple[list, float]:
        if num_tokens not in self._eval:
            windows = eval_windows(self.loaded.tokenizer, num_tokens=num_tokens, window=256)
            self._eval[num_tokens] = windows, perplexity(self.ref, windows)
        return self._eval[num_tokens]

    def comparison(self):
        """Notebook 05's comparison: (rows by scheme, engines by scheme), made once."""
        if self._comparison is None:
            sweep = SWEEPS["full"]
            engines = {"float": self.ref}
            for name, kw in NOTEBOOK_SCHEMES.items():
                q = self.quantized(name, calib_size=sweep.calib_size, calib_max_seq_len=sweep.calib_max_seq_len, **kw)
                engines[name] = Engine.from_network(NetworkBuilder(q).build())
            windows = eval_windows(self.loaded.tokenizer, num_tokens=sweep.num_tokens, window=256)
            rows = compare(engines, "float", windows, progress=False)
            self._comparison = rows.set_index("scheme"), engines
        return self._comparison

    def increase(self, sweep: Sweep, name: str, **kw) -> tuple[float, Engine]:
        """Perplexity increase in percent of preset `name` under `sweep`, and its engine."""
        if sweep == SWEEPS["full"] and NOTEBOOK_SCHEMES.get(name) == kw:
            rows, engines = self.comparison()  # the same quantization and windows, already measured
            return float(rows.loc[name, "ppl_delta_pct"]), engines[name]
        windows, base = self.windows(sweep.num_tokens)
        q = self.quantized(name, calib_size=sweep.calib_size, calib_max_seq_len=sweep.calib_max_seq_len, **kw)
        engine = Engine.from_network(NetworkBuilder(q).build())
        return 100.0 * (perplexity(engine, windows) / base - 1.0), engine


@pytest.fixture(scope="session")
def accuracy(smollm2, quantized_smollm2):
    return Accuracy(smollm2, quantized_smollm2)


def test_the_comparison_is_notebook_05s():
    """The notebook quantizes and compares exactly what `Accuracy.comparison` does (so it hits the cache)."""
    cells = ["".join(c["source"]) for c in json.loads(NOTEBOOK_05.read_text())["cells"] if c["cell_type"] == "code"]
    quantize = next(c for c in cells if "SCHEMES = {" in c)
    schemes = ast.literal_eval(quantize[quantize.index("{"):quantize.index("}}") + 2])  # the literal dict
    assert schemes == NOTEBOOK_SCHEMES and list(schemes) == list(NOTEBOOK_SCHEMES)
    full = SWEEPS["full"]
    assert f"calib_size={full.calib_size}, calib_max_seq_len={full.calib_max_seq_len}, **kw" in quantize
    assert "quantize(loaded, texts, progress=False)" in quantize and "texts = calibration_texts()" in quantize
    assert 'engines = {"float": Engine.from_network(NetworkBuilder(loaded).build())}' in quantize
    assert any(f"eval_windows(loaded.tokenizer, num_tokens={full.num_tokens}, window=256)" in c
               and 'compare(engines, "float", windows)' in c for c in cells)


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


def test_fp8_within_5pct_on_the_fast_size(accuracy):
    """The always-run version of the FP8 bound (measured +2.74 % here; the 3 % bound is `full`'s)."""
    fp8, _ = accuracy.increase(SWEEPS["fast"], "fp8")
    print(f"[fast] ppl increase: FP8 {fp8:.2f}%")
    assert fp8 <= 5.0


@pytest.mark.slow
def test_fp8_within_3pct(accuracy):
    fp8, _ = accuracy.increase(SWEEPS["full"], "fp8")
    print(f"ppl increase: FP8 {fp8:.2f}%")
    assert fp8 <= 3.0


def test_int4_rtn_is_a_quarter_of_bf16_plus_scales_and_loses_accuracy(accuracy):
    """The always-run version of the int4 comparison: RTN alone on the fast size (AWQ's and GPTQ's
    searches are the slow part; their comparison with RTN is `full`'s)."""
    rtn, rtn_engine = accuracy.increase(SWEEPS["fast"], "int4_wo", group_size=64)
    w8a16, _ = accuracy.increase(SWEEPS["fast"], "int8_wo")
    print(f"[fast] ppl increase (group 64): RTN {rtn:.1f}%  W8A16 {w8a16:.2f}%")
    assert rtn > w8a16  # 4 bits cost more than 8
    ratio = memory(rtn_engine)["linear_weight_mib"] / (memory(accuracy.ref)["linear_weight_mib"] / 2)
    assert 0.25 < ratio < 0.25 + 2 / 64 + 0.01


@pytest.mark.slow
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
