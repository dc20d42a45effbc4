"""Per-row symmetric 8-bit quantization: the one rule behind every 8-bit tensor of the engine.

A row is the last dim of x [..., K]; QMAX is 127 (INT8) or 448 (FP8 e4m3, its largest finite value):
    amax  = max |x| over the row, in fp32
    scale = max(amax / QMAX, SCALE_FLOOR)          fp32 [...]; an all-zero row quantizes to zeros
    y     = clamp(x * (1 / scale), -QMAX, QMAX)    one reciprocal per row, one multiply per element
    q     = y rounded to nearest, ties to even      INT8: an integer; FP8: the nearest e4m3 value
so that x ~= q * scale. Every step is one correctly rounded IEEE fp32 operation (the division a true
division), so the torch functions here give the same bits on every device, and the Triton helpers below
the same bits as they (tests/test_kernels_rowquant.py: under the interpreter on the CPU, and `-m cuda` on a
GPU; tools/check_rowquant_gpu.py shows every step on a GPU). Inputs with NaN or inf are outside the rule.

The torch side divides by a tensor on x's device, never by a Python number: torch's CUDA division by a
CPU scalar is `a * fl(1 / b)` (BinaryDivTrueKernel.cu, "may lose one bit"), which gives a scale one ulp
off for some rows (5 % of them for /127, half for /448) and so flips the codes of values near a rounding
tie: 0.1 % of the FP8 codes of bf16 activations (whose few mantissa bits make near-ties common) on an
H200, where the compiled Triton kernels divide exactly (div.rn.f32).

Why ties to even: it is what torch.round and every FP8 cast do (torch, cuBLAS, the tensor cores), so INT8
and FP8 share it and the torch side is one exact call each; in Triton INT8 costs two fp32 additions
((y + 1.5 * 2^23) - 1.5 * 2^23 rounds |y| < 2^22 to an integer) and needs no libdevice call, which the CPU
interpreter cannot run. Round half away from zero (the Triton kernels' old rule) needs a sign select
besides the additions, and its trunc(y + 0.5) spelling is not even exact (0.49999997 + 0.5 rounds to 1).
Triton details: its `/` is an approximate division on the GPU, so the two divisions per row use
tl.math.div_rn; the clamp sits between the multiply and the additions, so they cannot fuse into an FMA
(the sm_90 SASS of Triton 3.6 and 3.9 has FFMA and FTZ only inside the two divisions' sequences).
FP8 on a GPU is the hardware conversion (cvt.rn.satfinite.e4m3x2.f32), ties to even as torch's cast; what
either does beyond 448 never matters after the clamp.
Under the interpreter, whose own fp32 -> e4m3 cast rounds wrongly, FP8 values are first rounded onto the
e4m3 grid by the same additions with the constant moved to y's binade (its ulp is e4m3's step there),
after which that cast is exact.

`QuantRows` carries one activation quantized by this rule to every W8A8 layer that reads it (quantize once,
feed many: lowvram.quantize.fuse).

Used by the KV caches and the INT8 sink (runtime.kv_cache, model.dit), the 8-bit attention (its cache and
its Q tiles, kernels.attention8), the GEMM backends (quantize.backends, kernels.gemm), the weight quantizer
(quantize.linear) and the kernels' references.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowvram.kernels.configs import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch functions
    triton = None

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_FLOOR = 1e-12  # smallest scale: an all-zero row quantizes to zeros instead of NaN
RNE_MAGIC = 12582912.0  # 1.5 * 2^23: (y + RNE_MAGIC) - RNE_MAGIC rounds fp32 |y| < 2^22 to an integer, ties to even


def _scaled(x: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    # x [..., K] -> (y = clamp(x / scale) fp32 [..., K], scale fp32 [...])
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # [...]
    # a true division on every device: a Python-number divisor would be a * fl(1 / qmax) on CUDA
    scale = torch.div(amax, amax.new_full((), qmax)).clamp_min_(SCALE_FLOOR)
    y = (xf * scale.reciprocal().unsqueeze(-1)).clamp_(-qmax, qmax)
    return y, scale


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8: x [..., K] -> (int8 [..., K], fp32 scale [...]) with x ~= q * scale."""
    y, scale = _scaled(x, INT8_MAX)
    return y.round_().to(torch.int8), scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 e4m3: x [..., K] -> (float8_e4m3fn [..., K], fp32 scale [...]) with x ~= q * scale."""
    y, scale = _scaled(x, FP8_MAX)
    return y.to(torch.float8_e4m3fn), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., K] * scale [...] in `dtype`, or written into `out` (its dtype; no full-size fp32 temporary)."""
    if out is not None:  # torch does not promote float8: widen it (exactly) to out's dtype first
        q = q.to(out.dtype) if q.dtype == torch.float8_e4m3fn else q
        return torch.mul(q, scale.unsqueeze(-1), out=out)
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


class QuantRows(NamedTuple):
    """An activation x [..., K] already quantized by this rule, ready for a W8A8 GEMM (quantize once, feed many):
    q [M, K] int8 or float8_e4m3fn and scale [M] fp32 over x's M = prod(shape[:-1]) rows, with x's shape and
    dtype (what a linear fed by it returns: shape[:-1] + [N] in dtype)."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: tuple
    dtype: torch.dtype

    @classmethod
    def of(cls, x: torch.Tensor, fp8: bool) -> "QuantRows":
        """x [..., K] quantized by the torch functions below (kernels.gemm.quantize_rows is the kernel)."""
        q, s = (quantize_rows_fp8 if fp8 else quantize_rows_int8)(x.reshape(-1, x.shape[-1]))
        return cls(q, s, tuple(x.shape), x.dtype)

    @property
    def scheme(self) -> str:
        return "fp8" if self.q.dtype == torch.float8_e4m3fn else "int8"

    def split(self, rows: int) -> list["QuantRows"]:
        """Chunks of `rows` consecutive rows (the last may be shorter), as x.reshape(-1, K).split(rows)."""
        k = self.q.shape[-1]
        return [QuantRows(q, s, (q.shape[0], k), self.dtype)
                for q, s in zip(self.q.split(rows), self.scale.split(rows))]


if triton is not None:
    _FLOOR = tl.constexpr(SCALE_FLOOR)
    _MAGIC = tl.constexpr(RNE_MAGIC)
    _INTERPRETED = tl.constexpr(interpreting())  # read at import, as Triton itself decides

    @triton.jit
    def scale_of(amax, QMAX: tl.constexpr):
        """(scale, 1 / scale) of rows whose fp32 absmax is amax (any shape)."""
        scale = tl.maximum(tl.math.div_rn(amax, QMAX), _FLOOR)
        return scale, tl.math.div_rn(1.0, scale)

    @triton.jit
    def round_8bit(y, QMAX: tl.constexpr, FP8: tl.constexpr, OUT_TY: tl.constexpr):
        """y = x / scale (fp32, any shape) -> clamped, rounded to nearest (ties to even), as OUT_TY."""
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if FP8:
            if _INTERPRETED:  # onto the e4m3 grid first: the interpreter's own cast rounds wrongly
                bits = y.to(tl.int32, bitcast=True)
                e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # |y|'s binade; e4m3 subnormals step like 2^-6's
                big = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^(e + 20): ulp 2^(e - 3)
                r = (tl.abs(y) + big) - big
                y = tl.where(bits < 0, -r, r)  # the sign bit back (-0.0 stays -0.0, as torch's cast)
            q = y.to(OUT_TY)  # GPU: cvt.rn.satfinite, ties to even
        else:
            q = ((y + _MAGIC) - _MAGIC).to(tl.int32).to(tl.int8)
        return q

    @triton.jit
    def quantize_tile(x, QMAX: tl.constexpr, FP8: tl.constexpr, OUT_TY: tl.constexpr):
        """Each row of an fp32 tile x [R, C] quantized: (q [R, C] as OUT_TY, scale [R] fp32)."""
        scale, inv = scale_of(tl.max(tl.abs(x), 1), QMAX)
        return round_8bit(x * inv[:, None], QMAX, FP8, OUT_TY), scale
