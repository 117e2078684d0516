import json

import pytest

from kit.config import SUPPORTED_ARCHITECTURES, ModelConfig


def test_reads_every_family(tiny_checkpoints):
    for fam, (path, hf) in tiny_checkpoints.items():
        cfg = ModelConfig.from_json(path / "config.json")
        assert cfg.family == hf.config.model_type
        assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16
        assert cfg.qkv_bias == (cfg.family == "qwen2")
        assert cfg.qk_norm == (cfg.family == "qwen3")
        assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    assert ModelConfig.from_json(tiny_checkpoints["mistral"][0] / "config.json").sliding_window == 6
    llama3 = ModelConfig.from_json(tiny_checkpoints["llama3_rope"][0] / "config.json")
    assert llama3.rope_type == "llama3" and llama3.rope_scaling["factor"] == 8.0 and llama3.rope_theta == 500000.0


def test_round_trip_through_hf_dict(tiny_checkpoints):
    for path, _ in tiny_checkpoints.values():
        cfg = ModelConfig.from_json(path / "config.json")
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_unsupported_architecture_names_it_and_lists_supported():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_config({"model_type": "gpt2", "vocab_size": 10})
    msg = str(e.value)
    assert "gpt2" in msg
    for family in SUPPORTED_ARCHITECTURES:
        assert family in msg


def test_missing_required_fields_name_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json: missing required field\(s\) intermediate_size"):
        ModelConfig.from_json(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(p)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path / "nope" / "config.json")


@pytest.mark.parametrize("field,value", [("num_attention_heads", 0), ("num_key_value_heads", 3),
                                         ("head_dim", 7), ("rms_norm_eps", 0.0), ("sliding_window", -1)])
def test_validation_names_the_field(field, value):
    base = dict(family="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=2)
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**base, field: value})


def test_gguf_metadata_of_smollm2(smollm2):
    c = smollm2.config
    assert (c.family, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings and c.eos_token_ids == (2,)
    assert c.num_parameters() == smollm2.num_parameters
