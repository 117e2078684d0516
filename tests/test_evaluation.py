import math

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kit.engine import Engine  # noqa: E402
from kit.evaluation import compare, eval_windows, layer_errors, logit_agreement, memory, perplexity  # noqa: E402
from kit.network import NetworkBuilder  # noqa: E402


@pytest.fixture(scope="module")
def engines(smollm2):
    ref = Engine.from_network(NetworkBuilder(smollm2).build())
    noisy_w = dict(smollm2.weights)
    g = torch.Generator().manual_seed(0)
    for k, v in noisy_w.items():
        if k.endswith("mlp.down_proj.weight"):
            noisy_w[k] = v + 0.3 * v.std() * torch.randn(v.shape, generator=g)
    from kit.loader import LoadedModel

    noisy = LoadedModel(smollm2.config, noisy_w, smollm2.tokenizer, name="noisy")
    return ref, Engine.from_network(NetworkBuilder(noisy).build())


@pytest.fixture(scope="module")
def windows(smollm2):
    return eval_windows(smollm2.tokenizer, num_tokens=512, window=128)


def test_perplexity_equals_exp_of_cross_entropy_from_transformers(smollm2, engines, windows):
    ref, _ = engines
    hf = smollm2.to_transformers()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = hf(torch.tensor([w])).logits[0]
            nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
            n += len(w) - 1
    assert perplexity(ref, windows) == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert 5 < perplexity(ref, windows) < 100


def test_agreement_and_layer_errors(engines, windows):
    ref, noisy = engines
    same = logit_agreement(ref, ref, windows[:1])
    assert same["kl_div"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    diff = logit_agreement(ref, noisy, windows[:1])
    assert diff["kl_div"] > 1e-3 and diff["top1_agreement"] < 1.0
    errs = layer_errors(ref, noisy, windows[:1])
    assert list(errs["layer"]) == [layer.name for layer in ref.network]
    first_mlp = errs.index[errs.layer == "layers.0.mlp"][0]
    assert (errs.loc[:first_mlp - 1, "rel_mse"] == 0).all() and errs.loc[first_mlp, "rel_mse"] > 0


def test_compare_frame_and_widget(engines, windows):
    ref, noisy = engines
    df = compare({"float": ref, "noisy": noisy}, "float", windows[:2], progress=False)
    assert list(df["scheme"]) == ["float", "noisy"]
    assert df.loc[0, "ppl_delta_pct"] == 0.0 and df.loc[1, "ppl_delta_pct"] > 0
    assert df.loc[0, "linear_weight_ratio"] == 1.0 and df["num_tokens"].iloc[0] == 256
    # one forward per engine and window gives exactly what the separate measurements give
    assert df.loc[1, "perplexity"] == perplexity(noisy, windows[:2])
    agreement = logit_agreement(ref, noisy, windows[:2])
    assert df.loc[1, "kl_div"] == agreement["kl_div"] and df.loc[1, "top1_agreement"] == agreement["top1_agreement"]
    m = memory(ref)
    assert m["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    from widgets.quant_compare import QuantComparison

    w = QuantComparison(df, speed=pd.DataFrame({"scheme": ["float", "noisy"], "tokens_per_s": [10.0, 20.0]}),
                        layer_errors={"noisy": layer_errors(ref, noisy, windows[:1])})
    assert w.point_data[:, 1].tolist() == pytest.approx(df["ppl_delta_pct"].tolist())
    w.x.value = "tokens_per_s"
    assert w.point_data[:, 0].tolist() == [10.0, 20.0]
    w.y.value = "kl_div"
    assert w.point_data[1, 1] == pytest.approx(df.loc[1, "kl_div"])
    with pytest.raises(ValueError, match="reference"):
        compare({"float": ref}, "bf16", windows)
