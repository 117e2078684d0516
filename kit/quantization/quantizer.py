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
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
import torch
from kit.progress import tqdm

from kit.loader import LoadedModel
from kit.quantization import awq, fp8, gptq, int4, int8_weight_only, smoothquant
from kit.quantization.calibration import LINEAR_GROUPS, BlockRunner, LinearGroup, embed, final_norm
from kit.quantization.config import QuantAlgo, QuantConfig

__all__ = ["Quantizer", "calibration_tokens"]

_A = QuantAlgo


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
        from kit.datasets import calibration_texts

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


class Quantizer:
    """`Quantizer(QuantConfig.from_name("int4_awq")).quantize(loaded)` -> quantized LoadedModel."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.report: pd.DataFrame | None = None
        self._rows: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- driving
    def _repr_html_(self) -> str:
        body = self.config._repr_html_()
        if self.report is not None and len(self.report):
            summary = self.report.groupby("module")["weight_rel_error"].mean().rename("mean weight_rel_error")
            body += "<p><b>Last run</b>: relative weight error by module</p>" + summary.to_frame().to_html(
                border=0, float_format="%.5f")
        return f"<b>Quantizer</b>{body}"

    def quantize(self, loaded: LoadedModel, calib_texts: Sequence[str | Sequence[int]] | None = None, *,
                 tokenizer: Any = None, progress: bool = True) -> LoadedModel:
        qc, cfg = self.config, loaded.config
        self._rows = []
        new: dict[str, dict[str, torch.Tensor]] = {}  # "<prefix>.weight" -> its replacement tensors
        changed: dict[str, torch.Tensor] = {}  # float tensors rewritten in place (norms, scaled weights)
        notes = [f"quantized: {qc}"]
        hidden = None
        if qc.needs_calibration:
            tokens, note = calibration_tokens(calib_texts, tokenizer or loaded.tokenizer, cfg.vocab_size,
                                              qc.calib_size, qc.calib_max_seq_len)
            notes.append(note)
            hidden = embed(loaded.weights, tokens)  # (B, T, hidden) float32
        if qc.quant_algo is not _A.NO_QUANT:
            for i in tqdm(range(cfg.num_hidden_layers), desc=f"quantizing {qc.quant_algo.value}",
                          disable=not progress, leave=False):
                hidden = self._quantize_block(loaded, i, hidden, new, changed)
            if not cfg.tie_word_embeddings and "lm_head.weight" in loaded.weights and not qc.is_excluded("lm_head"):
                x = final_norm(loaded.weights, cfg, hidden).reshape(-1, cfg.hidden_size) if hidden is not None else None
                w = {"lm_head": loaded.weights["lm_head.weight"].float()}
                self._quantize_group(LinearGroup("lm_head", ("lm_head",), None), w, x, new, changed, None)
        weights: dict[str, torch.Tensor] = {}
        for name, t in loaded.weights.items():
            if name in new:
                prefix = name[: -len(".weight")]
                for suffix, q in new[name].items():
                    weights[f"{prefix}.{suffix}"] = q.to(t.device)
            else:
                weights[name] = changed[name].to(device=t.device, dtype=t.dtype) if name in changed else t
        self.report = pd.DataFrame(self._rows, columns=["module", "block", "scheme", "out_features", "in_features",
                                                        "weight_rel_error", "alpha"])
        kept = sum(1 for r in self._rows if r["scheme"] == "float")
        notes.append(f"{len(self._rows) - kept} linears quantized, {kept} excluded (kept in float)")
        return LoadedModel(cfg, weights, loaded.tokenizer, loaded.name, loaded.source, dict(loaded.identity),
                           qc, loaded.source_format, list(loaded.notes) + notes)

    def _quantize_block(self, loaded: LoadedModel, i: int, hidden: torch.Tensor | None,
                        new: dict, changed: dict) -> torch.Tensor | None:
        runner = BlockRunner(loaded.config, loaded.weights, i)
        p = f"model.layers.{i}."
        sequential = self.config.quant_algo is _A.W4A16_GPTQ
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
        qc, algo = self.config, self.config.quant_algo
        todo = [p for p in group.members if not qc.is_excluded(p)]
        for p in group.members:
            if p not in todo:
                self._row(p, block, "float", w[p], None, math.nan)
        if not todo:
            return
        alpha = math.nan
        pqs = None
        if algo in (_A.W4A16_AWQ, _A.W8A8_SQ_PER_CHANNEL):
            # per-input-channel s: W * s, x / s (folded into the norm, or stored as pre_quant_scale)
            if algo is _A.W4A16_AWQ:
                res = awq.search_scale(x, [w[p] for p in todo], qc.group_size, qc.has_zero_point)
                s, alpha = res.scale, res.alpha
            else:
                s = smoothquant.smooth_scales(x.abs().amax(0), [w[p] for p in todo], qc.smoothquant_alpha)
            if norm is not None:
                changed[group.norm + ".weight"] = norm / s
                for p in group.members:  # excluded members read the same norm: scale them too (exact)
                    w[p] = w[p] * s
                    if p not in todo:
                        changed[p + ".weight"] = w[p]
            else:
                pqs = 1.0 / s
                w = {p: w[p] * s for p in w}
        if algo is _A.W4A16_GPTQ:
            stacked = torch.cat([w[p] for p in todo], 0)
            stored, deq = gptq.gptq_quantize(stacked, gptq.hessian(x), qc.group_size, qc.has_zero_point)
            row = 0
            for p in todo:
                n = w[p].shape[0]
                new[p + ".weight"] = {k: v[row:row + n] for k, v in stored.items()}
                self._row(p, block, "W4A16_GPTQ", w[p], deq[row:row + n], alpha)
                if runner is not None:  # later groups of this block see the quantized weight
                    runner.set_weight(p[len(f"model.layers.{block}."):], deq[row:row + n])
                row += n
            return
        for p in todo:
            stored, deq = self._quantize_one(w[p], x)
            if pqs is not None:
                stored["pre_quant_scale"] = pqs.float()
            new[p + ".weight"] = stored
            self._row(p, block, algo.value, w[p], deq, alpha)

    def _quantize_one(self, w: torch.Tensor, x: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(stored tensors, dequantized float32 weight) of one linear's (scaled) weight."""
        qc, algo = self.config, self.config.quant_algo
        if algo in (_A.W8A16, _A.W8A8, _A.W8A8_SQ_PER_CHANNEL):
            st = int8_weight_only.quantize_linear(w)
            return st, int8_weight_only.dequantize_weight(st["qweight"], st["weight_scale"])
        if algo in (_A.W4A16, _A.W4A16_AWQ):
            st = int4.quantize_linear(w, qc.group_size, qc.has_zero_point)
            return st, int4.dequantize_weight(st["qweight"], st["weight_scale"], st.get("weight_zero"), qc.group_size)
        if algo in (_A.FP8, _A.FP8_PER_CHANNEL_PER_TOKEN):
            per_channel = algo is _A.FP8_PER_CHANNEL_PER_TOKEN
            st = fp8.quantize_linear(w, per_channel=per_channel, input_amax=None if x is None else x.abs().amax())
            return st, fp8.dequantize(st["qweight"], st["weight_scale"])
        raise ValueError(f"Quantizer: no weight quantization for {algo}")

    def _row(self, module: str, block: int | None, scheme: str, w: torch.Tensor, deq: torch.Tensor | None,
             alpha: float) -> None:
        err = 0.0 if deq is None else ((deq.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12)).item()
        self._rows.append({"module": module, "block": block, "scheme": scheme, "out_features": w.shape[0],
                           "in_features": w.shape[1], "weight_rel_error": err, "alpha": alpha})
