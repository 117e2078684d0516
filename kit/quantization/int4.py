"""int4 weights in groups, round-to-nearest (`W4A16`), and the int4 format shared by
AWQ and GPTQ.

A row of the (out, in) weight is cut into groups of `group_size` consecutive input
channels; each group gets its own scale (and, optionally, zero point), so one outlier
weight only coarsens its own group. Every weight becomes an unsigned 4-bit code
u in 0..15:

    symmetric   s = amax / 7                      u = clamp(round(w / s) + 8, 0, 15)   w ~ (u - 8) * s
    zero point  s = (max - min) / 15, z = round(-min / s)
                                                  u = clamp(round(w / s) + z, 0, 15)   w ~ (u - z) * s

The symmetric grid wastes half a step of range on a group whose weights are all of one
sign; the zero point spends 4 more bits a group to fit the grid to [min, max].

Packing: two codes share one byte along the input dim, the even column in the low
nibble and the odd column in the high nibble:

    packed[o, j] = u[o, 2j] | (u[o, 2j + 1] << 4)

Stored tensors (`<prefix>.` omitted): `qweight` uint8 (out, in / 2), `weight_scale`
float16 (out, in / group_size), and with a zero point `weight_zero` uint8
(out, in / group_size). Scales are float16 as in AWQ / GPTQ checkpoints; the codes are
computed against the float16-rounded scale, so dequantizing is exact.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "group_params", "quantize_codes", "quantize_weight", "dequantize_weight",
           "fake_quantize", "quantize_linear", "SCALE_DTYPE"]

SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-6  # representable in float16 (as a subnormal), keeps an all-zero group finite


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) with values 0..15 (any integer dtype) -> uint8 (out, in / 2)."""
    if u.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {u.shape[-1]}")
    u = u.to(torch.uint8)
    return (u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in / 2) -> codes uint8 (out, in), the inverse of `pack_int4`."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def group_params(w: torch.Tensor, has_zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group. w (..., group) -> (scale (...,), zero (...,)), float32.

    The scale is rounded to float16 (the stored dtype) before it is returned.
    """
    wf = w.float()
    if has_zero_point:
        wmax, wmin = wf.amax(dim=-1).clamp(min=0), wf.amin(dim=-1).clamp(max=0)
        scale = ((wmax - wmin) / 15).clamp(min=_MIN_SCALE).to(SCALE_DTYPE).float()
        zero = torch.round(-wmin / scale).clamp(0, 15)
    else:
        scale = (wf.abs().amax(dim=-1) / 7).clamp(min=_MIN_SCALE).to(SCALE_DTYPE).float()
        zero = torch.full_like(scale, 8.0)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (float32, same shape as w) for weights w given broadcastable scale / zero."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 15)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"in_features {inp} is not a multiple of QuantConfig.group_size {group_size}; "
                         f"choose a group_size that divides it (e.g. {inp & -inp})")
    return w.reshape(out, inp // group_size, group_size)


def quantize_weight(w: torch.Tensor, group_size: int, has_zero_point: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w (out, in) -> (qweight uint8 (out, in/2), scale float16 (out, G), zero uint8 (out, G) or None)."""
    g = _grouped(w, group_size)  # (out, G, group)
    scale, zero = group_params(g, has_zero_point)  # (out, G)
    codes = quantize_codes(g, scale[..., None], zero[..., None]).reshape(w.shape)
    zero_t = zero.to(torch.uint8) if has_zero_point else None
    return pack_int4(codes), scale.to(SCALE_DTYPE), zero_t


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """float32 (out, in) = (u - z) * s for every group (z = 8 when there is no zero point)."""
    u = unpack_int4(qweight).float()
    out, inp = u.shape
    g = u.reshape(out, inp // group_size, group_size)
    z = zero.float()[..., None] if zero is not None else 8.0
    return ((g - z) * scale.float()[..., None]).reshape(out, inp)


def fake_quantize(w: torch.Tensor, group_size: int, has_zero_point: bool = False) -> torch.Tensor:
    """Quantize and dequantize in one step (float32, shape of w): what the int4 weight will be."""
    g = _grouped(w, group_size)
    scale, zero = group_params(g, has_zero_point)
    codes = quantize_codes(g, scale[..., None], zero[..., None])
    return ((codes - zero[..., None]) * scale[..., None]).reshape(w.shape)


def quantize_linear(w: torch.Tensor, group_size: int, has_zero_point: bool) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear (names after `<prefix>.`)."""
    q, s, z = quantize_weight(w, group_size, has_zero_point)
    out = {"qweight": q, "weight_scale": s}
    if z is not None:
        out["weight_zero"] = z
    return out
