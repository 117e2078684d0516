"""How much a quantization scheme costs in accuracy, and what it saves in memory.

Every measurement runs the same token windows through a reference engine (the
unquantized model) and a candidate engine, via the kit's own `Engine.forward`:

* `perplexity(engine, windows)` — exp of the mean next-token negative log-likelihood on
  held-out text (`kit.datasets.eval_text()`, a split that calibration never sees);
* `logit_agreement(ref, cand, windows)` — mean KL(p_ref || p_cand) per position and the
  share of positions whose argmax agrees (top-1 agreement);
* `layer_errors(ref, cand, windows)` — relative MSE of each layer's output against the
  reference's, with the errors of earlier layers carried along (what the model sees);
* `memory(network)` — weight bytes of the linear layers and of everything, and KV bytes
  per token;
* `compare(schemes, ...)` — one row per scheme with all of the above; the notebook and
  `widgets.quant_compare.QuantComparison` read it.

Columns of `compare`: `scheme, perplexity, ppl_delta_pct, kl_div, top1_agreement,
linear_weight_mib, weight_mib, linear_weight_ratio, kv_bytes_per_token, num_tokens`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import torch

from kit.backends.base import LayerHook
from kit.batch import ForwardBatch, SequenceInput
from kit.datasets import chunk_tokens, eval_text
from kit.engine import Engine
from kit.network import Layer
from kit.progress import tqdm
from kit.quantization.cache import ResultCache, code_version, digest_json, weights_digest

__all__ = ["eval_windows", "perplexity", "logit_agreement", "layer_errors", "memory", "compare"]

_LINEAR_KINDS = ("qkv_proj", "o_proj", "mlp")


def eval_windows(tokenizer: Any, num_tokens: int = 4096, window: int = 256, text: str | None = None) -> list[list[int]]:
    """Non-overlapping windows of the held-out evaluation text, `num_tokens` in all."""
    ids = tokenizer.encode(text if text is not None else eval_text(), add_special_tokens=False)
    windows = chunk_tokens(ids, window)[: max(1, num_tokens // window)]
    if not windows:
        raise ValueError(f"the evaluation text has fewer than {window} tokens")
    return windows


@torch.inference_mode()
def _window_logits(engine: Engine, window: list[int], hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
    """Logits (len(window), vocab) in float32 of one window computed from an empty (scratch) cache."""
    bs = 16
    kv = engine.allocate_kv_cache(-(-len(window) // bs), bs, capture_graphs=False)
    batch = ForwardBatch.build([SequenceInput(window, 0, list(range(kv.num_blocks)), logits="all")], bs,
                               device=engine.device)
    return engine.forward(batch, kv, hooks=hooks).float()


def perplexity(engine: Engine, windows: Iterable[list[int]], progress: bool = False) -> float:
    """exp(mean NLL of each token given the ones before it in its window)."""
    nll, count = 0.0, 0
    for w in tqdm(list(windows), desc="perplexity", disable=not progress, leave=False):
        logits = _window_logits(engine, w)
        target = torch.tensor(w[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
        count += len(w) - 1
    return math.exp(nll / count)


def logit_agreement(reference: Engine, candidate: Engine, windows: Iterable[list[int]]) -> dict[str, float]:
    """Mean KL(p_ref || p_cand) per position and top-1 agreement, over all window positions."""
    kl, agree, n = 0.0, 0, 0
    for w in windows:
        ref = torch.log_softmax(_window_logits(reference, w), -1)
        cand = torch.log_softmax(_window_logits(candidate, w).to(ref.device), -1)
        kl += (ref.exp() * (ref - cand)).sum(-1).sum().item()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        n += len(w)
    return {"kl_div": kl / n, "top1_agreement": agree / n}


class _FirstOutputs(LayerHook):
    """Keeps each layer's first output (float32 copies), as the layer wrote it."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}

    def after(self, layer: Layer, outputs: Mapping[str, torch.Tensor]) -> None:
        self.outputs[layer.name] = outputs[layer.outputs[0]].detach().float().clone()


def _capture(engine: Engine, window: list[int]) -> dict[str, torch.Tensor]:
    """Each layer's first output over one window, captured by a per-layer hook."""
    hook = _FirstOutputs()
    _window_logits(engine, window, hooks=[hook])
    return hook.outputs


def layer_errors(reference: Engine, candidate: Engine, windows: Iterable[list[int]]) -> pd.DataFrame:
    """Per layer: `layer, kind, block, rel_mse` = |out_cand - out_ref|^2 / |out_ref|^2, summed over windows."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for w in windows:
        ref, cand = _capture(reference, w), _capture(candidate, w)
        for name, r in ref.items():
            c = cand[name].to(r.device)
            num[name] = num.get(name, 0.0) + (c - r).pow(2).sum().item()
            den[name] = den.get(name, 0.0) + r.pow(2).sum().item()
    rows = [{"layer": layer.name, "kind": layer.kind, "block": layer.block,
             "rel_mse": num[layer.name] / max(den[layer.name], 1e-30)}
            for layer in reference.network if layer.name in num]
    return pd.DataFrame(rows)


def memory(engine: Engine) -> dict[str, float]:
    """Weight bytes of the linear layers (q/k/v, o, MLP) and of everything; KV bytes per token."""
    net = engine.network
    df = net.to_frame()
    linear = int(df[df.kind.isin(_LINEAR_KINDS)]["weight_bytes"].sum())
    return {"linear_weight_mib": linear / 2**20, "weight_mib": net.weight_bytes / 2**20,
            "kv_bytes_per_token": float(engine.kv_bytes_per_token)}


# the code compare's numbers depend on (see kit.quantization.cache.code_version)
_EVAL_CODE = ("quantization", "ops.py", "config.py", "batch.py", "network.py", "engine.py", "backends", "evaluation.py")
_COMPARE_COLUMNS = ["scheme", "perplexity", "ppl_delta_pct", "kl_div", "top1_agreement", "linear_weight_mib",
                    "weight_mib", "linear_weight_ratio", "kv_bytes_per_token", "num_tokens"]


def _engine_identity(engine: Engine) -> dict[str, Any]:
    """What an engine's outputs depend on: its build key, or its network's content."""
    net = engine.network
    qc = net.quant_config
    return {"build_key": engine.build_key, "weights": None if engine.build_key else weights_digest(net.weights),
            "layers": [(layer.name, layer.kind, layer.weights) for layer in net],
            "config": net.config.to_hf_config(), "quant_config": qc.to_dict() if qc is not None else None,
            "backend": type(engine.backend).__name__, "device": engine.device.type, "dtype": str(engine.dtype)}


def compare(schemes: Mapping[str, Engine], reference: str, windows: list[list[int]], *,
            progress: bool = True, use_cache: bool = True) -> pd.DataFrame:
    """One row per scheme (engines by name; `reference` names the unquantized one).

    The rows are cached (`ResultCache`, `$KIT_CACHE_DIR/results`) by the engines' identities
    (build key, or the content of their weights), the windows and the kit's code.
    """
    if reference not in schemes:
        raise ValueError(f"reference {reference!r} is not one of the schemes {list(schemes)}")
    cache = ResultCache() if use_cache else None
    key = None
    if cache is not None:
        key = "compare-" + digest_json({"engines": {n: _engine_identity(e) for n, e in schemes.items()},
                                        "reference": reference, "windows": windows, "kit": code_version(_EVAL_CODE)})
        hit = cache.get(key)
        if isinstance(hit, list) and [r.get("scheme") for r in hit] == list(schemes):
            return pd.DataFrame(hit, columns=_COMPARE_COLUMNS)
    # NOTE: one forward per (engine, window): the reference's logits of a window serve its own
    # perplexity and every candidate's KL and agreement. The sums run over the windows in order with the
    # same expressions as `perplexity` and `logit_agreement`, so every figure equals theirs.
    nll, kl, agree = dict.fromkeys(schemes, 0.0), dict.fromkeys(schemes, 0.0), dict.fromkeys(schemes, 0)
    count, n = 0, 0
    with tqdm(total=len(windows) * len(schemes), desc="comparing schemes", disable=not progress, leave=False) as bar:
        for w in windows:
            ref_logits = _window_logits(schemes[reference], w)  # (len(w), vocab) float32
            ref = torch.log_softmax(ref_logits, -1)
            for name, engine in schemes.items():
                logits = ref_logits if name == reference else _window_logits(engine, w)
                target = torch.tensor(w[1:], device=logits.device)
                nll[name] += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
                if name != reference:
                    cand = torch.log_softmax(logits.to(ref.device), -1)
                    kl[name] += (ref.exp() * (ref - cand)).sum(-1).sum().item()
                    agree[name] += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
                bar.update(1)
            count += len(w) - 1
            n += len(w)
    rows = []
    for name, engine in schemes.items():
        row = {"scheme": name, "perplexity": math.exp(nll[name] / count)}
        row.update({"kl_div": kl[name] / n, "top1_agreement": agree[name] / n} if name != reference else
                   {"kl_div": 0.0, "top1_agreement": 1.0})
        row.update(memory(engine))
        rows.append(row)
    df = pd.DataFrame(rows)
    base = df.loc[df.scheme == reference].iloc[0]
    df["ppl_delta_pct"] = 100.0 * (df["perplexity"] / base["perplexity"] - 1.0)
    df["linear_weight_ratio"] = df["linear_weight_mib"] / base["linear_weight_mib"]
    df["num_tokens"] = sum(len(w) for w in windows)
    df = df[_COMPARE_COLUMNS]
    if cache is not None:
        cache.put(key, df.to_dict(orient="records"))
    return df
