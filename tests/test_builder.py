"""BuildConfig, the Builder, engine directories and the build cache."""

import json
import threading
import time

import pytest
import torch

from helpers import run_chunks
from kit.builder import BuildCache, BuildConfig, Builder
from kit.cache_entry import BLOBS_DIR
from kit.engine_dir import load_engine, save_engine
from kit.llm import LLM, SamplingParams
from kit.loader import ModelLoader
from kit.network import NetworkBuilder

SMALL = dict(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64, block_size=4)


@pytest.mark.parametrize("field,value", [("max_batch_size", 0), ("max_input_len", 4096), ("opt_batch_size", 99),
                                         ("dtype", "int3"), ("profiling_verbosity", "loud"), ("max_beam_width", 0),
                                         ("kv_cache_type", "contiguous"), ("cuda_graph_batch_sizes", (0,))])
def test_build_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BuildConfig(**{field: value})


def test_build_config_derived_shapes():
    bc = BuildConfig(max_batch_size=64, max_input_len=512, max_seq_len=1024, max_num_tokens=2048)
    assert bc.graph_batch_sizes == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert BuildConfig(max_batch_size=6).graph_batch_sizes == (1, 2, 4, 6)
    prof = bc.optimization_profiles()
    assert prof["batch_size"] == (1, 32, 64) and prof["past_len"] == (0, 512, 1023)
    assert BuildConfig.from_dict(bc.to_dict()) == bc


def test_build_cache_hit_miss_and_same_outputs(cache_dir, tiny_checkpoints):
    path = str(tiny_checkpoints["llama"][0])
    sp = SamplingParams(max_tokens=6, temperature=0)
    with LLM(path, device="cpu", build_config=BuildConfig(**SMALL)) as first:
        assert not first.build_cache_hit
        a = first.generate([5, 6, 7, 8], sp).outputs[0].token_ids
    assert len(BuildCache().list()) == 1
    with LLM(path, device="cpu", build_config=BuildConfig(**SMALL)) as second:
        assert second.build_cache_hit
        assert second.generate([5, 6, 7, 8], sp).outputs[0].token_ids == a
        assert second.loaded.config == second.engine.config  # loaded on first access after a hit
    with LLM(path, device="cpu", build_config=BuildConfig(**{**SMALL, "max_batch_size": 2})) as third:
        assert not third.build_cache_hit
    with LLM(path, device="cpu", build_config=BuildConfig(**SMALL), skip_build_cache=True) as fourth:
        assert not fourth.build_cache_hit
    df = BuildCache().list()
    assert len(df) == 2 and sorted(df["max_batch_size"]) == [2, 4]


def test_second_start_of_smollm2_is_at_least_5x_faster(cache_dir):
    bc = BuildConfig(max_batch_size=4, max_seq_len=256, max_input_len=128, max_num_tokens=256)
    t0 = time.perf_counter()
    with LLM("smollm2-135m", device="cpu", build_config=bc) as llm:
        cold = time.perf_counter() - t0
        text = llm.generate("The capital of France is", SamplingParams(max_tokens=5, temperature=0)).text
    t0 = time.perf_counter()
    with LLM("smollm2-135m", device="cpu", build_config=bc) as llm:
        warm = time.perf_counter() - t0
        assert llm.build_cache_hit
        assert llm.generate("The capital of France is", SamplingParams(max_tokens=5, temperature=0)).text == text
    print(f"first start {cold:.2f} s, from the build cache {warm:.2f} s: {cold / warm:.1f}x")
    assert cold / warm >= 5


def test_a_build_killed_half_way_leaves_no_entry(cache_dir, tiny_checkpoints, monkeypatch):
    import safetensors.torch

    path = str(tiny_checkpoints["qwen2"][0])
    real = safetensors.torch.save_file

    def dying_save(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed while writing the engine")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        LLM(path, device="cpu", build_config=BuildConfig(**SMALL))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    root = cache_dir / "engines"
    assert not [p for p in root.iterdir()] if root.exists() else True  # no entry, no temp dir
    with LLM(path, device="cpu", build_config=BuildConfig(**SMALL)) as llm:
        assert not llm.build_cache_hit
    # no temp dir left; the one other dot directory is the weight-blob store, each blob linked by the entry
    assert len(BuildCache().list()) == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.name != BLOBS_DIR]
    assert all(b.stat().st_nlink == 2 for b in (root / BLOBS_DIR).iterdir())


def test_concurrent_builders_of_one_key(cache_dir, tiny_checkpoints):
    loaded = ModelLoader(tiny_checkpoints["mistral"][0]).load()
    network = NetworkBuilder(loaded).build()
    errors, engines = [], []

    def build():
        try:
            engines.append(Builder("torch", device="cpu").build(network, BuildConfig(**SMALL), loaded=loaded,
                                                                progress=False))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(engines) == 4
    root = cache_dir / "engines"
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1
    assert BuildCache().get(engines[0].build_key) is not None


def test_engine_directory_round_trip_and_refusals(tmp_path, tiny_checkpoints):
    path, hf = tiny_checkpoints["qwen3"]
    loaded = ModelLoader(path).load()
    engine = Builder("torch", device="cpu").build(NetworkBuilder(loaded).build(), BuildConfig(**SMALL),
                                                  loaded=loaded, enable_build_cache=False, progress=False)
    d = save_engine(engine, tmp_path / "engine")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    again = load_engine(d, device="cpu")
    seqs = [[5, 9, 13, 2, 7, 7, 1], [40, 41]]
    sched = [[4, 2], [3, 0], [0, 0]]
    for a, b in zip(run_chunks(engine, seqs, sched, 4), run_chunks(again, seqs, sched, 4)):
        assert torch.equal(a, b)
    # LLM opens the directory directly, and refuses a different build config
    with LLM(str(d), device="cpu") as llm:
        assert llm.engine.source_dir == d
    with pytest.raises(ValueError, match="built for another configuration: max_batch_size=8 asked"):
        LLM(str(d), device="cpu", build_config=BuildConfig(**{**SMALL, "max_batch_size": 8}))
    # an altered config or a truncated weight file is refused, never half-used
    cfg = json.loads((d / "config.json").read_text())
    cfg["build_config"]["max_seq_len"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="build key mismatch"):
        load_engine(d)
    save_engine(engine, d, overwrite=True)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        load_engine(d)
    with pytest.raises(FileNotFoundError, match="not an engine directory"):
        load_engine(tmp_path)


def test_tensorrt_engine_is_built_saved_and_refuses_to_run_here(tmp_path, tiny_checkpoints):
    pytest.importorskip("tensorrt_rtx")
    loaded = ModelLoader(tiny_checkpoints["llama"][0], dtype=torch.float16).load()
    engine = Builder("tensorrt", device="cpu").build(NetworkBuilder(loaded).build(), BuildConfig(**SMALL),
                                                     loaded=loaded, enable_build_cache=False, progress=False)
    assert [r["step"] for r in engine.build_log] == ["prepare network on the backend", "build TensorRT plan"]
    d = save_engine(engine, tmp_path / "trt")
    assert (d / "rank0.engine").stat().st_size > 100_000
    again = load_engine(d, device="cpu")
    assert again.backend.plan.plan == engine.backend.plan.plan
    from kit.engine import ForwardBatch, SequenceInput

    batch = ForwardBatch.build([SequenceInput([1, 2], 0, [0])], 4)
    with pytest.raises(RuntimeError, match="use the PyTorch backend"):
        again.backend.forward(batch, None)


def test_an_engine_built_without_a_model_identity_reopens(tmp_path, tiny_checkpoints):
    import kit

    loaded = ModelLoader(tiny_checkpoints["llama"][0]).load()
    engine = kit.build(NetworkBuilder(loaded).build(), BuildConfig(**SMALL), device="cpu", progress=False)
    d = save_engine(engine, tmp_path / "e")
    assert load_engine(d).build_key == engine.build_key is not None


def test_get_engine_computes_the_key_once_and_answers_a_hit_without_building(cache_dir, tiny_checkpoints,
                                                                                monkeypatch):
    import kit.builder

    path = tiny_checkpoints["llama"][0]  # a Path, like a str
    keys = []
    real_key = kit.builder.build_key
    monkeypatch.setattr(kit.builder, "build_key", lambda *a: keys.append(a) or real_key(*a))
    first = Builder("torch", device="cpu").get_engine(path, BuildConfig(**SMALL), progress=False)
    assert not first.cache_hit and first.loaded is not None and len(keys) == 1
    assert [r["step"] for r in first.engine.build_log] == ["prepare network on the backend", "store in build cache"]

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not build")

    monkeypatch.setattr(Builder, "_build", no_build)
    monkeypatch.setattr(Builder, "build", no_build)
    second = Builder("torch", device="cpu").get_engine(path, BuildConfig(**SMALL), progress=False)
    assert second.cache_hit and second.loaded is None and len(keys) == 2
    assert second.engine.build_key == first.engine.build_key
    assert second.engine.build_log[0]["step"] == "build cache hit"
    # an engine directory is opened as it is, by Path or str
    d = save_engine(second.engine, cache_dir.parent / "engine-dir")
    for model in (d, str(d)):
        opened = Builder("torch", device="cpu").get_engine(model)
        assert opened.engine.source_dir == d and not opened.cache_hit and len(keys) == 2


def test_engine_module_does_not_know_the_builder():
    import ast
    from pathlib import Path

    import kit.engine

    tree = ast.parse(Path(kit.engine.__file__).read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {"kit.builder", "kit.build_cache", "kit.engine_dir", "kit.build_config"} & names
    assert not hasattr(kit.engine.Engine, "from_dir") and not hasattr(kit.engine.Engine, "save")
