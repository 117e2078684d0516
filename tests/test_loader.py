import os

import pytest
import torch

from kit.loader import SYNTHETIC_PRESETS, ModelLoader, cache_dir, weight_shapes


def test_hf_directory_weights_equal_transformers(tiny_checkpoints):
    path, hf = tiny_checkpoints["qwen2"]
    loaded = ModelLoader(path).load()
    sd = hf.state_dict()
    for name, t in loaded.weights.items():
        assert torch.equal(t, sd[name]), name
    assert loaded.source_format == "hf" and loaded.identity["sha256"]


def test_sharded_checkpoint(tmp_path, tiny_checkpoints):
    _, hf = tiny_checkpoints["llama"]
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = ModelLoader(tmp_path).load()
    sd = hf.state_dict()
    assert set(loaded.weights) == set(sd)
    assert all(torch.equal(loaded.weights[k], sd[k]) for k in sd)
    # a missing shard is named
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        ModelLoader(tmp_path).load()


def test_truncated_safetensors_is_refused_with_its_name(tmp_path, tiny_checkpoints):
    _, hf = tiny_checkpoints["llama"]
    hf.save_pretrained(str(tmp_path))
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
        ModelLoader(tmp_path).load()


def test_missing_things_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        ModelLoader(tmp_path / "nope").load()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelLoader(tmp_path).load()
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, '
                                          '"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ModelLoader(tmp_path).load()


def test_checkpoint_missing_a_tensor(tmp_path, tiny_checkpoints):
    from safetensors.torch import load_file, save_file

    _, hf = tiny_checkpoints["llama"]
    hf.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        ModelLoader(tmp_path).load()


def test_gguf_is_cached_as_safetensors(smollm2):
    entries = list((cache_dir() / "models").glob(f"{smollm2.identity['sha256'][:24]}*"))
    assert len(entries) == 1 and (entries[0] / "model.safetensors").exists()
    # no half-written temp dirs beside it
    assert not [p for p in (cache_dir() / "models").iterdir() if p.name.startswith(".")]
    again = ModelLoader("smollm2-135m").load()
    assert all(torch.equal(again.weights[k], v) for k, v in smollm2.weights.items())
    assert smollm2.tokenizer is not None and smollm2.notes


def test_gguf_dequantization_matches_transformers(smollm2):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from kit.loader import registered_model_path

    hf_cfg = {k: v for k, v in smollm2.config.to_hf_config().items() if k != "architectures"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_cfg))
    ref = load_gguf_checkpoint(str(registered_model_path("smollm2-135m")), return_tensors=True,
                               model_to_load=model)["tensors"]
    assert set(ref) == set(smollm2.weights)
    for k, v in ref.items():
        assert torch.equal(torch.as_tensor(v).float(), smollm2.weights[k]), k


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        ModelLoader(bad).load()


@pytest.mark.parametrize("preset,params", [("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248),
                                           ("qwen2.5-0.5b", 494_032_768)])
def test_synthetic_presets_have_the_real_shapes(preset, params):
    loaded = ModelLoader.synthetic(preset, device="meta", dtype=torch.bfloat16)
    assert loaded.num_parameters == params == loaded.config.num_parameters()
    assert all(t.dtype == torch.bfloat16 and t.device.type == "meta" for t in loaded.weights.values())
    assert set(loaded.weights) == set(weight_shapes(loaded.config))


def test_synthetic_is_seeded_and_made_in_place():
    a = ModelLoader.synthetic("qwen2.5-0.5b", seed=3, num_layers=1, dtype=torch.bfloat16)
    b = ModelLoader.synthetic("qwen2.5-0.5b", seed=3, num_layers=1, dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.config.num_hidden_layers == 1
    assert torch.equal(a.weights["model.layers.0.mlp.up_proj.weight"], b.weights["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        ModelLoader.synthetic("gpt-5")
    assert set(SYNTHETIC_PRESETS) == {"llama-3.2-1b", "llama-3.1-8b", "qwen2.5-0.5b", "smollm2-135m"}


def test_the_smollm2_preset_has_the_embedded_models_shapes(smollm2):
    """GPU benchmarks without the GGUF file use this preset: it must be the embedded model's config (its eps
    differs only by the GGUF's float32 rounding of 1e-5)."""
    import dataclasses

    from kit.config import ModelConfig

    preset = ModelConfig(**SYNTHETIC_PRESETS["smollm2-135m"])
    assert preset.rms_norm_eps == pytest.approx(smollm2.config.rms_norm_eps, rel=1e-7)
    assert dataclasses.replace(preset, rms_norm_eps=smollm2.config.rms_norm_eps) == smollm2.config
    small = ModelLoader.synthetic("smollm2-135m", num_layers=1)
    assert weight_shapes(small.config) == {k: v for k, v in weight_shapes(smollm2.config).items()
                                           if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
