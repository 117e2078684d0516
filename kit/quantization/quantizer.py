"""`Quantizer`: a float `LoadedModel` in, a quantized `LoadedModel` out.

Step one of the two steps of quantization (the second, swapping each linear's
execution, is `build_linear`, which the engine's backend calls when the network has a
`quant_config`). For every linear not matched by `QuantConfig.exclude_modules`, the
float `<prefix>.weight` is replaced by the scheme's tensors (`<prefix>.qweight`,
`<prefix>.weight_scale`, ...; see each scheme's module). The embedding is never
quantized, so a tied lm_head (which reads the embedding) stays in float too.

Calibration (FP8's static input scales, AWQ, GPTQ, SmoothQuant) runs the model one
decoder block at a time on `calib_size` windows of `calib_max_seq_len` tokens
(`kit.quantization.calibration`), holding one block's activations at a time:

* FP8, SmoothQuant and AWQ read activations of the *float* model (their scaling is
  exact math, so the scaled model's activations are the same; AutoAWQ does this too);
* GPTQ is sequential, as in the paper and AutoGPTQ: inside a block q/k/v are
  quantized first, then o_proj sees the output of the *quantized* q/k/v, and so on;
  the next block reads the output of the quantized block, so each layer compensates
  for the errors made before it.

`Quantizer.report` (a DataFrame, after `quantize`) has one row per linear: `module`,
`block`, `scheme`, `out_features`, `in_features`, `weight_rel_error` (||Q(W) - W|| /
||W||, against the weight that was quantized, i.e. after AWQ / SmoothQuant scaling) and
`alpha` (AWQ's chosen exponent; NaN for other schemes).

What differs between schemes is asked of the scheme object (`QuantConfig.scheme`, from
the registry in `schemes.py`): whether to calibrate, the smoothing scale, the stored
tensors. The result is cached (`QuantCache`, under `$KIT_CACHE_DIR/quantized`) by the
model's content, the config, the calibration tokens and the kit's code, so quantizing
the same model the same way again loads the same tensors in seconds.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
import torch
from kit.progress import tqdm

from kit.datasets import calibration_texts
from kit.loader import LoadedModel
from kit.quantization.cache import QuantCache, code_version, digest_json, tensor_digest, weights_digest
from kit.quantization.calibration import LINEAR_GROUPS, BlockRunner, LinearGroup, embed, final_norm
from kit.quantization.config import QuantConfig

__all__ = ["Quantizer", "calibration_tokens", "quant_cache_key"]

_REPORT_COLUMNS = ["module", "block", "scheme", "out_features", "in_features", "weight_rel_error", "alpha"]


def calibration_tokens(texts: Sequence[str | Sequence[int]] | None, tokenizer: Any, vocab_size: int,
                       num_windows: int, window: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(B, T) token windows from texts (strings need a tokenizer) or token-id lists, and a note.

    The texts are encoded one after another into one stream that is cut into at most
    `num_windows` windows of `window` tokens (shorter windows if the stream is short).
    With no texts: `kit.datasets.calibration_texts()` if there is a tokenizer, else
    random tokens (a synthetic model has no tokenizer and no meaningful text anyway).
    """
    if texts is None:
        if tokenizer is None:
            g = torch.Generator().manual_seed(seed)
            return (torch.randint(0, vocab_size, (num_windows, window), generator=g),
                    "calibrated on random tokens (the model has no tokenizer)")
        texts = calibration_texts()
    stream: list[int] = []
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("calibration texts are strings but the model has no tokenizer: pass "
                                 "tokenizer=..., or token-id lists as calib_texts")
            stream += tokenizer.encode(t)
        else:
            stream += [int(i) for i in t]
        if len(stream) >= num_windows * window:
            break
    if not stream:
        raise ValueError("calibration texts are empty")
    if max(stream) >= vocab_size or min(stream) < 0:
        raise ValueError(f"calibration token ids must lie in 0..{vocab_size - 1}")
    t_len = min(window, len(stream))
    b = max(1, min(num_windows, len(stream) // t_len))
    note = f"calibrated on {b} windows of {t_len} tokens"
    return torch.tensor(stream[:b * t_len]).view(b, t_len), note


def quant_cache_key(loaded: LoadedModel, config: QuantConfig, tokens: torch.Tensor | None) -> str:
    """sha256 of what a quantization depends on: model content, config, calibration ids, code."""
    emb = loaded.weights.get("model.embed_tokens.weight")
    return digest_json({
        "model": {"identity": loaded.identity, "config": loaded.config.to_hf_config(),
                  "weights": weights_digest(loaded.weights),
                  "device": str(emb.device.type) if emb is not None else "cpu"},
        "quant_config": config.to_dict(),
        "calibration": None if tokens is None else tensor_digest(tokens),
        "kit": code_version(),
    })


class Quantizer:
    """`Quantizer(QuantConfig.from_name("int4_awq")).quantize(loaded)` -> quantized LoadedModel.

    After `quantize`: `report` (DataFrame), `cache_key` and `cache_hit` (whether the
    tensors came from the quantization cache).
    """

    def __init__(self, config: QuantConfig, *, cache: QuantCache | None = None) -> None:
        self.config = config
        self.cache = cache
        self.report: pd.DataFrame | None = None
        self.cache_key: str | None = None
        self.cache_hit = False
        self._rows: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- driving
    def _repr_html_(self) -> str:
        body = self.config._repr_html_()
        if self.cache_key is not None:
            body += f"<p>cache: {'hit' if self.cache_hit else 'stored'} <code>{self.cache_key[:16]}</code></p>"
        if self.report is not None and len(self.report):
            summary = self.report.groupby("module")["weight_rel_error"].mean().rename("mean weight_rel_error")
            body += "<p><b>Last run</b>: relative weight error by module</p>" + summary.to_frame().to_html(
                border=0, float_format="%.5f")
        return f"<b>Quantizer</b>{body}"

    def quantize(self, loaded: LoadedModel, calib_texts: Sequence[str | Sequence[int]] | None = None, *,
                 tokenizer: Any = None, progress: bool = True, use_cache: bool = True) -> LoadedModel:
        """The quantized model; from the cache when this model, config and calibration were seen."""
        qc, cfg = self.config, loaded.config
        scheme = qc.scheme
        self._rows, self.cache_key, self.cache_hit = [], None, False
        new: dict[str, dict[str, torch.Tensor]] = {}  # "<prefix>.weight" -> its replacement tensors
        changed: dict[str, torch.Tensor] = {}  # float tensors rewritten in place (norms, scaled weights)
        notes = [f"quantized: {qc}"]
        tokens = None
        if scheme.needs_calibration:
            tokens, note = calibration_tokens(calib_texts, tokenizer or loaded.tokenizer, cfg.vocab_size,
                                              qc.calib_size, qc.calib_max_seq_len)
            notes.append(note)
        cache = None
        if use_cache and scheme.quantizes_weights and loaded.quant_config is None:
            cache = self.cache or QuantCache()
            self.cache_key = quant_cache_key(loaded, qc, tokens)
            hit = cache.get(self.cache_key)
            unpacked = _unpack(*hit) if hit is not None else None
            if unpacked is not None:
                self.cache_hit = True
                new, changed, self._rows = unpacked
            elif hit is not None:  # whole files, inconsistent content: rebuild it
                cache.discard(self.cache_key)
        if scheme.quantizes_weights and not self.cache_hit:
            self._run(loaded, tokens, new, changed, progress)
            if cache is not None:
                cache.put(self.cache_key, *_pack(new, changed, self._rows))
        weights: dict[str, torch.Tensor] = {}
        for name, t in loaded.weights.items():
            if name in new:
                prefix = name[: -len(".weight")]
                for suffix, q in new[name].items():
                    weights[f"{prefix}.{suffix}"] = q.to(t.device)
            else:
                weights[name] = changed[name].to(device=t.device, dtype=t.dtype) if name in changed else t
        self.report = pd.DataFrame(self._rows, columns=_REPORT_COLUMNS)
        kept = sum(1 for r in self._rows if r["scheme"] == "float")
        notes.append(f"{len(self._rows) - kept} linears quantized, {kept} excluded (kept in float)"
                     + (" (from the quantization cache)" if self.cache_hit else ""))
        return LoadedModel(cfg, weights, loaded.tokenizer, loaded.name, loaded.source, dict(loaded.identity),
                           qc, loaded.source_format, list(loaded.notes) + notes)

    def _run(self, loaded: LoadedModel, tokens: torch.Tensor | None, new: dict, changed: dict,
             progress: bool) -> None:
        """Quantize every block (and an untied lm_head), calibrating on `tokens` if given."""
        qc, cfg = self.config, loaded.config
        hidden = embed(loaded.weights, tokens) if tokens is not None else None  # (B, T, hidden) float32
        for i in tqdm(range(cfg.num_hidden_layers), desc=f"quantizing {qc.quant_algo.value}", unit="block",
                      disable=not progress, leave=False):
            hidden = self._quantize_block(loaded, i, hidden, new, changed)
        if not cfg.tie_word_embeddings and "lm_head.weight" in loaded.weights and not qc.is_excluded("lm_head"):
            x = final_norm(loaded.weights, cfg, hidden).reshape(-1, cfg.hidden_size) if hidden is not None else None
            w = {"lm_head": loaded.weights["lm_head.weight"].float()}
            self._quantize_group(LinearGroup("lm_head", ("lm_head",), None), w, x, new, changed, None)

    def _quantize_block(self, loaded: LoadedModel, i: int, hidden: torch.Tensor | None,
                        new: dict, changed: dict) -> torch.Tensor | None:
        runner = BlockRunner(loaded.config, loaded.weights, i)
        p = f"model.layers.{i}."
        sequential = self.config.scheme.sequential
        acts: dict[str, torch.Tensor] = {}
        if hidden is not None and not sequential:  # one float forward captures every group's input
            _, acts = runner.run(hidden, want={g.name for g in LINEAR_GROUPS})
        for g in LINEAR_GROUPS:
            if hidden is not None and sequential:  # inputs through the already-quantized linears
                _, cap = runner.run(hidden, want={g.name}, until=g.name)
                acts[g.name] = cap[g.name]
            full = LinearGroup(g.name, tuple(p + m for m in g.members), p + g.norm if g.norm else None)
            w = {p + m: runner.weight(m) for m in g.members}
            norm = runner.w[f"{g.norm}.weight"] if g.norm else None
            self._quantize_group(full, w, acts.pop(g.name, None), new, changed, norm, runner, i)
        if hidden is None:
            return None
        out, _ = runner.run(hidden)  # the next block's input (GPTQ: through the quantized block)
        return out

    # ----------------------------------------------------------- one group
    def _quantize_group(self, group: LinearGroup, w: dict[str, torch.Tensor], x: torch.Tensor | None,
                        new: dict, changed: dict, norm: torch.Tensor | None,
                        runner: BlockRunner | None = None, block: int | None = None) -> None:
        """Quantize the linears of `group` (prefix -> float32 weight) that read activations x (T, in)."""
        qc = self.config
        scheme = qc.scheme
        todo = [p for p in group.members if not qc.is_excluded(p)]
        for p in group.members:
            if p not in todo:
                self._row(p, block, "float", w[p], None, math.nan)
        if not todo:
            return
        alpha = math.nan
        pqs = None
        smoothing = scheme.smooth(x, [w[p] for p in todo], qc)
        if smoothing is not None:
            # per-input-channel s: W * s, x / s (folded into the norm, or stored as pre_quant_scale)
            s, alpha = smoothing
            if norm is not None:
                changed[group.norm + ".weight"] = norm / s
                for p in group.members:  # excluded members read the same norm: scale them too (exact)
                    w[p] = w[p] * s
                    if p not in todo:
                        changed[p + ".weight"] = w[p]
            else:
                pqs = 1.0 / s
                w = {p: w[p] * s for p in w}
        for p, (stored, deq) in zip(todo, scheme.quantize([w[p] for p in todo], x, qc)):
            if pqs is not None:
                stored["pre_quant_scale"] = pqs.float()
            new[p + ".weight"] = stored
            self._row(p, block, qc.quant_algo.value, w[p], deq, alpha)
            if scheme.sequential and runner is not None:  # later groups of this block see the quantized weight
                runner.set_weight(p[len(f"model.layers.{block}."):], deq)

    def _row(self, module: str, block: int | None, scheme: str, w: torch.Tensor, deq: torch.Tensor | None,
             alpha: float) -> None:
        err = 0.0 if deq is None else ((deq.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12)).item()
        self._rows.append({"module": module, "block": block, "scheme": scheme, "out_features": w.shape[0],
                           "in_features": w.shape[1], "weight_rel_error": err, "alpha": alpha})


def _pack(new: dict[str, dict[str, torch.Tensor]], changed: dict[str, torch.Tensor],
          rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) for the cache: replaced weights' parts, rewritten float tensors, the report."""
    tensors = {f"q/{name}/{suffix}": t for name, parts in new.items() for suffix, t in parts.items()}
    tensors.update({f"f/{name}": t for name, t in changed.items()})
    meta = {"replaced": {name: list(parts) for name, parts in new.items()}, "changed": list(changed), "report": rows}
    return tensors, meta


def _unpack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict, dict, list[dict[str, Any]]] | None:
    """The inverse of `_pack`, or None if the entry does not hold what its meta names."""
    try:
        return _unpack_entry(tensors, meta)
    except (KeyError, TypeError, AttributeError):
        return None


def _unpack_entry(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict, dict, list[dict[str, Any]]]:
    new = {name: {suffix: tensors[f"q/{name}/{suffix}"] for suffix in suffixes}
           for name, suffixes in meta["replaced"].items()}
    changed = {name: tensors[f"f/{name}"] for name in meta["changed"]}
    return new, changed, [dict(r) for r in meta["report"]]
