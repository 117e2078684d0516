
from kit.network import LAYER_KINDS, NetworkBuilder


def test_smollm2_network_layers(smollm2):
    net = NetworkBuilder(smollm2).build()
    kinds = [layer.kind for layer in net]
    assert kinds[0] == "embedding" and kinds[-2:] == ["rmsnorm", "lm_head"]
    block0 = [layer.kind for layer in net if layer.block == 0]
    assert block0 == ["rmsnorm", "qkv_proj", "rope", "attention", "o_proj", "rmsnorm", "mlp"]
    assert len(net) == 1 + 30 * 7 + 2
    assert net["layers.3.attention"].attrs["layer_idx"] == 3
    assert net["lm_head"].attrs["tied"] and net["lm_head"].weights == ("model.embed_tokens.weight",)
    assert set(kinds) <= set(LAYER_KINDS)


def test_frame_counts_every_parameter(smollm2):
    net = NetworkBuilder(smollm2).build()
    df = net.to_frame()
    assert list(df.columns[:6]) == ["name", "kind", "block", "params", "weight_bytes", "dtype"]
    emb = smollm2.weights["model.embed_tokens.weight"].numel()
    # the tied head reads the embedding again: the frame counts it twice, the network once
    assert df["params"].sum() == net.num_parameters + emb == smollm2.num_parameters + emb
    assert (df["weight_bytes"] == df["params"] * 4).all()
    assert df.loc[df.name == "layers.0.mlp", "params"].item() == 3 * 576 * 1536
    html = net._repr_html_()
    assert "Network" in html and "layers.0.qkv_proj" in html and "layers.5.qkv_proj" not in html


def test_qwen3_has_qk_norm_and_qwen2_bias(tiny_checkpoints):
    from kit.loader import ModelLoader

    q3 = NetworkBuilder(ModelLoader(tiny_checkpoints["qwen3"][0]).load()).build()
    assert [l.kind for l in q3 if l.block == 1][2] == "qk_norm"
    q2 = NetworkBuilder(ModelLoader(tiny_checkpoints["qwen2"][0]).load()).build()
    assert any(w.endswith("q_proj.bias") for w in q2["layers.0.qkv_proj"].weights)
