"""Torch references for the Triton kernels; they double as the CPU fallbacks.

RoPE: `rope_apply` rotates interleaved pairs by per-token (cos, sin) multipliers; it is the model's
RoPE (lowvram.model.rope re-exports it) and the twin of the rotation inside the attention and fused
kernels. Attention: softmax(q k^T * scale) v over the union of two key segments, the KV window (keys
already roped) and the sink (keys un-roped, roped here with `rope_apply` at the sink's multipliers,
so the roped sink keys are bit-identical to what the model would have cached).
GEMM: W8A8 with per-token activation scales and per-output-channel weight scales, both quantized by
kernels/rowquant.py (INT8 absmax / 127, FP8 e4m3 absmax / 448, ties to even).
`compute_dtype` selects float64 (test reference), float32 (CPU fallback) or the input dtype
("plain torch in the same dtype", the error baseline of the tolerance rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowvram.kernels.rowquant import quantize_rows_fp8, quantize_rows_int8


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by per-token (cos, sin) [L, D/2]; returns x.dtype.

    bf16/fp16 inputs rotate in float32: a bf16 value (8-bit mantissa) times an fp16 multiplier (11-bit)
    is exact in float32, so the one rounding of each sum equals the reference's float64 result rounded
    to float32. float32 inputs rotate in float64."""
    work = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    xr = x.to(work).unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    c = cos.to(work)[None, :, None, :]
    s = sin.to(work)[None, :, None, :]
    a, b = xr[..., 0], xr[..., 1]
    out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return out.float().to(x.dtype) if x.dtype != torch.float64 else out


def rope_sink_keys(k_sink: torch.Tensor, sink_cos: torch.Tensor, sink_sin: torch.Tensor) -> torch.Tensor:
    """Rope un-roped sink keys k_sink [B, Ls, H, D] by their multipliers sink_cos/sink_sin [Ls, D/2]."""
    if k_sink.shape[1] == 0:
        return k_sink
    return rope_apply(k_sink, sink_cos.to(k_sink.device), sink_sin.to(k_sink.device))


def attention_reference(q, k_win, v_win, k_sink, v_sink, sink_cos, sink_sin, scale=None,
                        compute_dtype=torch.float64) -> torch.Tensor:
    """Explicit-math attention of q [B, Lq, H, D] over window + roped sink; returns compute_dtype.

    With compute_dtype = the input dtype this is plain torch in that dtype (scores and
    probabilities rounded to it), the baseline of the tolerance rule.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = torch.cat([k_win, rope_sink_keys(k_sink, sink_cos, sink_sin)], dim=1).to(compute_dtype)
    v = torch.cat([v_win, v_sink], dim=1).to(compute_dtype)
    qc = q.to(compute_dtype)
    s = torch.einsum("bqhd,bkhd->bhqk", qc, k) * scale  # [B, H, Lq, Lk]
    p = torch.softmax(s, dim=-1).to(compute_dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)  # [B, Lq, H, D]


def attention_torch(q, k_win, v_win, k_sink, v_sink, sink_cos, sink_sin, scale=None) -> torch.Tensor:
    """The fallback: SDPA on the concatenated keys (ropes the sink first); returns q.dtype."""
    k = torch.cat([k_win, rope_sink_keys(k_sink, sink_cos, sink_sin)], dim=1)
    v = torch.cat([v_win, v_sink], dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # [B, Lq, H, D]


def _scaled_linear(xq, x_scale, qweight, w_scale, bias, compute_dtype, out_dtype):
    # xq: [M, K], qweight: [N, K]; integer / fp8 operands are exact in float32 and float64
    acc = xq.to(compute_dtype) @ qweight.to(compute_dtype).T  # [M, N]
    out = acc * x_scale.to(compute_dtype)[:, None] * w_scale.to(compute_dtype)[None, :]
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(out_dtype)


def int8_linear_reference(x, qweight, w_scale, bias=None, compute_dtype=torch.float64, out_dtype=None):
    """W8A8: quantize x [M, K] per token, exact integer GEMM with qweight [N, K], scales, bias."""
    xq, xs = quantize_rows_int8(x)
    return _scaled_linear(xq, xs, qweight, w_scale, bias, compute_dtype, out_dtype or compute_dtype)


def fp8_linear_reference(x, qweight, w_scale, bias=None, compute_dtype=torch.float64, out_dtype=None):
    """FP8 W8A8: per-token e4m3 activations times qweight [N, K] (e4m3), scales, bias."""
    xq, xs = quantize_rows_fp8(x)
    return _scaled_linear(xq, xs, qweight, w_scale, bias, compute_dtype, out_dtype or compute_dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref|| in float64 (NaN propagates)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())
