"""GPTQ: int4 weights with second-order error compensation (Frantar et al., 2022).

Round-to-nearest treats each weight alone. GPTQ quantizes a row's weights one input
column at a time and pushes each column's rounding error onto the columns not yet
quantized, weighted so that the layer's *output* on calibration data moves as little
as possible. With X (T, in) the calibration inputs of the linear, the output error of
a row is (w - q) H (w - q)^T with the Hessian

    H = 2 X^T X / T                                            (in, in)

Quantizing column j with error e_j = (w_j - q_j) / [H^-1]_jj is optimally
compensated by w_{j+1:} -= e_j * [H^-1]_{j, j+1:} (the Optimal Brain Surgeon update).
The inverse rows come from the upper Cholesky factor of H^-1, computed once. Every
row of W uses the same H, so all rows run together, and a fused q/k/v or gate/up
matrix is one call.

Details as in the reference implementation (and AutoGPTQ with act_order off):
- damping: H += 1% of mean(diag H) * I, so the Cholesky factorisation exists;
- a dead input channel (diag H = 0: never active in calibration) gets H_jj = 1, W_j = 0;
- lazy batch updates: columns go in blocks of 128; within a block the update is
  applied column by column, to the rest of the matrix once a block (one GEMM);
- group-wise scales: when a column opens a new group of `group_size`, the group's
  scale / zero point are computed from the *updated* weights of that group.

The output is the same int4 format as round-to-nearest (see `kit.quantization.int4`).
"""

from __future__ import annotations

import torch

from kit.quantization.int4 import SCALE_DTYPE, group_params, pack_int4, quantize_codes

__all__ = ["hessian", "gptq_quantize", "PERCDAMP", "BLOCK_SIZE"]

PERCDAMP = 0.01
BLOCK_SIZE = 128


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / T in float32, for calibration inputs x (T, in)."""
    xf = x.reshape(-1, x.shape[-1]).float()
    return 2.0 * (xf.T @ xf) / xf.shape[0]


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, has_zero_point: bool = False,
                  *, percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Quantize w (out, in) with Hessian h (in, in).

    Returns (stored tensors `qweight` / `weight_scale` [/ `weight_zero`], the
    dequantized float32 weight (out, in)) — the latter feeds the next calibration stage.
    """
    W = w.float().clone()
    out_f, in_f = W.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of QuantConfig.group_size {group_size}")
    H = h.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(in_f, device=H.device, dtype=H.dtype)
    # upper Cholesky factor of H^-1: its row j holds what column j's error does to the later columns
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros_like(W)
    n_groups = in_f // group_size
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros(out_f, n_groups, device=W.device)
    scale = zero = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                # the group's columns: the updated ones of this block, then the rest of W
                grp = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :group_size]
                scale, zero = group_params(grp, has_zero_point)  # (out,)
                scales[:, g], zeros[:, g] = scale, zero
            wcol = W1[:, i]
            u = quantize_codes(wcol, scale, zero)  # (out,) codes 0..15
            q = (u - zero) * scale
            codes[:, col] = u
            err = (wcol - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    deq = ((codes.reshape(out_f, n_groups, group_size) - zeros[..., None]) * scales[..., None]).reshape(out_f, in_f)
    stored = {"qweight": pack_int4(codes), "weight_scale": scales.to(SCALE_DTYPE)}
    if has_zero_point:
        stored["weight_zero"] = zeros.to(torch.uint8)
    return stored, deq
