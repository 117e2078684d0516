"""AWQ: activation-aware weight quantization (Lin et al., 2023), the scale search.

Observation: a few input channels carry much larger activations than the rest, and
the weights that multiply them matter most for the output. Int4 rounding error is
the same for every weight of a group, so AWQ makes the important weights *larger*
before rounding (their relative error shrinks) and the matching activations smaller,
which leaves the float product unchanged:

    y = x @ W^T = (x / s) @ (W * s)^T        s: one factor per input channel (in,)

The factor is a power of how large each channel's activations are on calibration
data, s = mean|x|^alpha, with alpha searched over a grid in [0, 1]: for each alpha the
int4 weight Q(W * s) is built and the output error ||(x / s) @ Q(W * s)^T - x @ W^T||^2
on the calibration activations measured; the best alpha wins. alpha = 0 is s = 1,
plain round-to-nearest, so the search never does worse than RTN on its data.

Where `1 / s` goes (done by `Quantizer`): a linear that reads an RMSNorm's output
(q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm`) gets `1 / s`
folded into the norm's weight, for free at run time; q, k and v share one s (they read
the same x), as do gate and up. o_proj and down_proj read no norm: their `1 / s` is
stored as `pre_quant_scale` (in,) and multiplied into x at run time (ModelOpt's name).

Calibration choice (as AutoAWQ): each block's activations come from the *float* model
(scaling is exact, so they equal the scaled-but-unquantized model's); the error of
earlier quantized blocks is not fed forward. AutoAWQ's extra weight-clipping search is
left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kit.quantization.int4 import fake_quantize

__all__ = ["AWQResult", "search_scale", "DEFAULT_GRID"]

DEFAULT_GRID = 20  # alpha in 0, 1/20, ..., 19/20 (AutoAWQ's n_grid)


@dataclass
class AWQResult:
    """The chosen per-input-channel scale and what the search saw."""

    scale: torch.Tensor  # (in,) float32: multiply W's columns by it, divide x by it
    alpha: float
    losses: list[float]  # output MSE for each alpha of the grid
    rtn_loss: float  # the loss at alpha = 0 (plain round-to-nearest)


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, has_zero_point: bool = False,
                 *, n_grid: int = DEFAULT_GRID, max_rows: int = 4096) -> AWQResult:
    """Search alpha for the linears `weights` (each (out_i, in)) that all read `x` (T, in).

    The output error is summed over the linears (they share s). Uses at most `max_rows`
    calibration tokens, spread evenly, for the error.
    """
    x = x.float()
    if x.shape[0] > max_rows:
        x = x[torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()]
    w = torch.cat([wi.float() for wi in weights], 0)  # (out, in)
    x_mean = x.abs().mean(0)  # (in,) the activation magnitude of each input channel
    ref = x @ w.T  # (T, out)
    losses: list[float] = []
    best = (float("inf"), 0.0, torch.ones_like(x_mean))
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (as AutoAWQ)
        wq = fake_quantize(w * s, group_size, has_zero_point)  # (out, in) int4 grid of W * s
        loss = (((x / s) @ wq.T - ref) ** 2).mean().item()
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return AWQResult(scale=best[2], alpha=best[1], losses=losses, rtn_loss=losses[0])
