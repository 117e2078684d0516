"""Tests for kit/quantization/cache.py: quantized models and comparison results cached
under the kit's cache directory, keyed by what they depend on, rebuilt when damaged."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import kit.evaluation as evaluation
import kit.quantization.cache as cache_mod
from kit.config import ModelConfig
from kit.engine import Engine
from kit.loader import LoadedModel, random_weights
from kit.network import NetworkBuilder
from kit.quantization import QuantAlgo, QuantCache, QuantConfig, Quantizer, ResultCache
from kit.quantization.cache import code_version, tensor_digest, weights_digest

TINY = dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            max_position_embeddings=256)


def tiny_model(seed: int = 0) -> LoadedModel:
    cfg = ModelConfig(**TINY)
    w = random_weights(cfg, seed=seed, std=0.05)
    for k in w:
        if k.endswith("norm.weight"):
            w[k] = 1 + 0.2 * torch.rand(w[k].shape, generator=torch.Generator().manual_seed(seed + 1))
    return LoadedModel(cfg, w, name="tiny", source_format="synthetic")


def tokens(seed: int = 0) -> list[list[int]]:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed)).tolist()


def qconfig(algo: QuantAlgo = QuantAlgo.W4A16_AWQ) -> QuantConfig:
    return QuantConfig(quant_algo=algo, group_size=32, calib_size=4, calib_max_seq_len=32)


def assert_bit_identical(a: LoadedModel, b: LoadedModel) -> None:
    assert list(a.weights) == list(b.weights)
    for name, t in a.weights.items():
        u = b.weights[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        assert torch.equal(t.view(torch.uint8), u.view(torch.uint8)), name


@pytest.mark.parametrize("algo", [QuantAlgo.W4A16_AWQ, QuantAlgo.W4A16_GPTQ, QuantAlgo.FP8,
                                  QuantAlgo.W8A8_SQ_PER_CHANNEL, QuantAlgo.W8A16], ids=str)
def test_cache_hit_is_bit_identical(tmp_path, algo):
    loaded, cache = tiny_model(), QuantCache(tmp_path)
    first = Quantizer(qconfig(algo), cache=cache)
    q1 = first.quantize(loaded, tokens(), progress=False)
    assert not first.cache_hit and cache.keys() == [first.cache_key]
    second = Quantizer(qconfig(algo), cache=cache)
    q2 = second.quantize(loaded, tokens(), progress=False)
    assert second.cache_hit and second.cache_key == first.cache_key
    assert_bit_identical(q1, q2)
    pd.testing.assert_frame_equal(first.report, second.report)
    assert q2.quant_config == q1.quant_config and "from the quantization cache" in q2.notes[-1]
    uncached = Quantizer(qconfig(algo), cache=cache).quantize(loaded, tokens(), progress=False, use_cache=False)
    assert_bit_identical(q1, uncached)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "meta", "manifest"])
def test_a_damaged_entry_is_rebuilt(tmp_path, damage):
    loaded, cache = tiny_model(), QuantCache(tmp_path)
    first = Quantizer(qconfig(), cache=cache)
    q1 = first.quantize(loaded, tokens(), progress=False)
    entry = cache.path(first.cache_key)
    f = entry / "tensors.safetensors"
    size = f.stat().st_size
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: size // 2])
    elif damage == "garbage":  # same size, so the manifest passes: the file does not parse
        f.write_bytes(b"\xff" * size)
    elif damage == "meta":  # same size, valid JSON, names tensors that are not there
        meta = (entry / "meta.json").read_text()
        (entry / "meta.json").write_text(meta.replace("qweight", "qxeight"))
    else:
        (entry / "manifest.json").write_text("{")
    second = Quantizer(qconfig(), cache=cache)
    q2 = second.quantize(loaded, tokens(), progress=False)
    assert not second.cache_hit and second.cache_key == first.cache_key
    assert_bit_identical(q1, q2)
    third = Quantizer(qconfig(), cache=cache)
    third.quantize(loaded, tokens(), progress=False)
    assert third.cache_hit  # the rebuilt entry is whole again


def test_key_follows_calibration_data_config_and_weights(tmp_path):
    loaded, cache = tiny_model(), QuantCache(tmp_path)

    def key(model=loaded, qc=None, calib=None) -> str:
        quantizer = Quantizer(qc or qconfig(), cache=cache)
        quantizer.quantize(model, calib if calib is not None else tokens(), progress=False)
        return quantizer.cache_key

    base = key()
    assert key(calib=tokens(seed=1)) != base  # different calibration token ids
    assert key(qc=qconfig().replace(group_size=64)) != base
    assert key(model=tiny_model(seed=3)) != base
    assert key() == base
    assert len(cache.keys()) == 4
    # a scheme without calibration does not read the calibration data: one key for any
    rtn = qconfig(QuantAlgo.W4A16)
    assert key(qc=rtn, calib=tokens(seed=1)) == key(qc=rtn, calib=tokens(seed=2))
    # an in-place change of a weight is seen (torch's version counter invalidates the digest)
    w = loaded.weights["model.layers.0.mlp.up_proj.weight"]
    before = tensor_digest(w)
    w[0, 0] += 1.0
    assert tensor_digest(w) != before and key() != base


def test_no_quant_is_not_cached(tmp_path):
    cache = QuantCache(tmp_path)
    quantizer = Quantizer(QuantConfig(kv_cache_quant_algo="INT8"), cache=cache)
    q = quantizer.quantize(tiny_model(), progress=False)
    assert quantizer.cache_key is None and cache.keys() == [] and q.quant_config.kv_cache_quant_algo is not None


def test_default_cache_lives_under_kit_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path))
    quantizer = Quantizer(qconfig(QuantAlgo.W8A16))
    quantizer.quantize(tiny_model(), progress=False)
    entry = tmp_path / "quantized" / quantizer.cache_key
    files = json.loads((entry / "manifest.json").read_text())["files"]
    assert sorted(files) == ["meta.json", "tensors.safetensors"]
    assert all((entry / n).stat().st_size == s for n, s in files.items())
    assert not [p for p in (tmp_path / "quantized").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_weights_digest_depends_on_names_and_bytes():
    w = {"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.float16)}
    d = weights_digest(w)
    assert weights_digest(dict(reversed(list(w.items())))) == d  # name order does not matter
    assert weights_digest({"a": torch.zeros(3), "c": w["b"]}) != d
    assert weights_digest({"a": torch.zeros(3, dtype=torch.float64), "b": w["b"]}) != d
    assert weights_digest({**w, "a": torch.tensor([0.0, 0.0, 1e-30])}) != d
    assert code_version().count("+") == 1


def test_result_cache_round_trip_and_damage(tmp_path):
    cache = ResultCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", [{"x": 1.5, "y": None}])
    assert cache.get("k") == [{"x": 1.5, "y": None}]
    (cache.path("k") / "result.json").write_text("[{}]")  # wrong size: removed, a miss
    assert cache.get("k") is None and not cache.path("k").exists()


def test_compare_results_are_cached_by_engine_content_and_windows(tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path))
    loaded = tiny_model()
    q = Quantizer(qconfig(QuantAlgo.W8A16)).quantize(loaded, progress=False)
    engines = {"float": Engine.from_network(NetworkBuilder(loaded).build()),
               "int8_wo": Engine.from_network(NetworkBuilder(q).build())}
    windows = tokens()[:2]
    first = evaluation.compare(engines, "float", windows, progress=False)
    assert len(list(ResultCache().keys())) == 1

    def no_eval(*args, **kwargs):
        raise AssertionError("compare evaluated an engine on a warm cache")

    monkeypatch.setattr(evaluation, "_window_logits", no_eval)  # every forward compare runs
    second = evaluation.compare(engines, "float", windows, progress=False)
    pd.testing.assert_frame_equal(first, second)
    with pytest.raises(AssertionError, match="warm cache"):  # other windows: a new key, evaluated
        evaluation.compare(engines, "float", tokens(seed=5)[:2], progress=False)
    with pytest.raises(AssertionError, match="warm cache"):  # another engine under the same name: evaluated
        q4 = Quantizer(qconfig(QuantAlgo.W4A16)).quantize(loaded, progress=False)
        evaluation.compare({**engines, "int8_wo": Engine.from_network(NetworkBuilder(q4).build())}, "float",
                           windows, progress=False)
    with pytest.raises(AssertionError, match="warm cache"):
        evaluation.compare(engines, "float", windows, progress=False, use_cache=False)


def test_key_changes_with_the_quantization_code_including_the_run_time_layouts(tmp_path, monkeypatch):
    """A quantized entry is keyed by the code of kit/quantization/ (weight_layout.py and the kernels
    included): a changed layout or kernel is a new key, so an old entry is never read back by new code."""
    kit_copy = tmp_path / "kit"
    shutil.copytree(cache_mod._KIT_DIR / "quantization", kit_copy / "quantization")
    monkeypatch.setattr(cache_mod, "_KIT_DIR", kit_copy)
    base = code_version()
    for name in ("weight_layout.py", "stream_gemm.py"):
        f = kit_copy / "quantization" / name
        original = f.read_text()
        f.write_text(original + "\n# changed\n")
        assert code_version() != base, name
        f.write_text(original)
        assert code_version() == base
    loaded, cache = tiny_model(), QuantCache(tmp_path / "cache")
    q = Quantizer(qconfig(QuantAlgo.W4A16), cache=cache)
    q.quantize(loaded, progress=False)
    (kit_copy / "quantization" / "weight_layout.py").write_text("# another layout\n")
    q2 = Quantizer(qconfig(QuantAlgo.W4A16), cache=cache)
    q2.quantize(loaded, progress=False)
    assert q2.cache_key != q.cache_key and not q2.cache_hit
