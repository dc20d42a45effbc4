"""Matmul backends of `QuantLinear`: y = x @ dequant(W).T + b for an 8-bit weight with per-output-channel scales.

Every backend is `fn(x, qweight, w_scale, bias) -> y` with x: [M, K] (bf16/fp16/fp32), qweight: [N, K] int8 or
float8_e4m3fn, w_scale: [N] fp32, bias: [N] or None, y: [M, N] in x.dtype.

- "reference": dequantize the weight to x.dtype and F.linear (weight-only; any device). Also the fallback.
- "int_mm":    W8A8. Per-token dynamic INT8 activations (absmax / 127 per row, kernels/rowquant.py),
               torch._int_mm (int32 accumulate), scales and bias applied in fp32.
- "scaled_mm": W8A8. Per-token dynamic FP8 e4m3 activations (absmax / 448 per row, kernels/rowquant.py),
               torch._scaled_mm with row-wise scales and bf16 output (CUDA sm_89+; recent CPU builds too).
- "triton":    the fused kernels of `lowvram.kernels.gemm`, registered when Triton is installed; an explicit
               "triton" runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests), as kernels/fused.py's.
The W8A8 backends also take rows quantized already (`Backend.quantized(xq, xs, qweight, w_scale, bias, out_dtype)`,
a rowquant.QuantRows' q and scale): each quantizes by kernels/rowquant.py's rule, so a copy shared by several
layers gives each the bits of its own quantization (lowvram.quantize.fuse).
"auto" picks per call: CPU -> reference; CUDA -> triton where it loads (activation quantization, scales and
bias fused: in the 4090 profile at 704x384 on an H200 the DiT ran 1.70x faster than with int_mm, 5.89 vs 10.02
s per clip, tools/bench.py 2026-11-22), else int8 -> int_mm, fp8 on sm_89+ -> scaled_mm, else reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lowvram.errors import LowvramError
from lowvram.kernels import gemm
from lowvram.kernels.rowquant import quantize_rows_fp8, quantize_rows_int8


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    supports: Callable[[torch.Tensor, torch.Tensor], bool]  # (x, qweight) -> can this backend run it
    quantized: Callable | None = None  # the matmul on quantized rows (W8A8 backends; module docstring)


_REGISTRY: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, supports: Callable | None = None,
                     quantized: Callable | None = None) -> None:
    """Add or replace a backend (see the module docstring for the calling convention)."""
    _REGISTRY[name] = Backend(name, fn, supports or (lambda x, w: True), quantized)


def reference_linear(x, qweight, w_scale, bias):
    w = (qweight.float() * w_scale.float()[:, None]).to(x.dtype)  # [N, K]
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def int_mm_linear(x, qweight, w_scale, bias):
    xq, x_scale = quantize_rows_int8(x)  # [M, K] int8, [M]
    return int_mm_quantized(xq, x_scale, qweight, w_scale, bias, x.dtype)


def int_mm_quantized(xq, x_scale, qweight, w_scale, bias, out_dtype):
    m = xq.shape[0]
    if xq.is_cuda and m <= 16:  # cuBLAS int8 GEMM needs M > 16: pad with zero rows
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    acc = torch._int_mm(xq, qweight.t())[:m]  # [M, N] int32
    y = acc.float() * x_scale[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _int_mm_supports(x, qweight):
    if qweight.dtype != torch.int8:
        return False
    if x.is_cuda:  # cuBLASLt int8 needs K and N multiples of 8
        return qweight.shape[0] % 8 == 0 and qweight.shape[1] % 8 == 0
    return True


def scaled_mm_linear(x, qweight, w_scale, bias):
    xq, x_scale = quantize_rows_fp8(x)  # [M, K] fp8, [M]
    return scaled_mm_quantized(xq, x_scale, qweight, w_scale, bias, x.dtype)


def scaled_mm_quantized(xq, x_scale, qweight, w_scale, bias, out_dtype):
    y = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale[:, None], scale_b=w_scale.float()[None, :],
                         bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
    return y.to(out_dtype)  # [M, N]


def _scaled_mm_supports(x, qweight):
    if qweight.dtype != torch.float8_e4m3fn:
        return False
    if x.is_cuda:  # FP8 tensor cores (Ada/Hopper); K and N multiples of 16
        return (torch.cuda.get_device_capability(x.device) >= (8, 9)
                and qweight.shape[0] % 16 == 0 and qweight.shape[1] % 16 == 0)
    return x.device.type == "cpu" and _cpu_scaled_mm()


@functools.cache
def _cpu_scaled_mm() -> bool:
    """Whether this torch build has a CPU row-wise _scaled_mm (recent releases do; older raise)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def triton_linear(x, qweight, w_scale, bias):
    """The fused W8A8 kernels of lowvram.kernels.gemm (activation quantization, scales and bias inside)."""
    fn = gemm.int8_linear if qweight.dtype == torch.int8 else gemm.fp8_linear
    return fn(x, qweight, w_scale, bias)


def triton_quantized(xq, x_scale, qweight, w_scale, bias, out_dtype):
    """gemm.w8a8_linear: the GEMM of triton_linear on quantized rows (bf16 out, as triton_linear)."""
    return gemm.w8a8_linear(xq, x_scale, qweight, w_scale, bias)


def _triton_supports(x, qweight):
    # CUDA, or the CPU under the interpreter when asked for by name ("auto" keeps the reference on the CPU)
    return qweight.dtype in (torch.int8, torch.float8_e4m3fn) and gemm.triton_usable(x)


register_backend("reference", reference_linear)
register_backend("int_mm", int_mm_linear, _int_mm_supports, int_mm_quantized)
register_backend("scaled_mm", scaled_mm_linear, _scaled_mm_supports, scaled_mm_quantized)
if gemm.triton is not None:
    register_backend("triton", triton_linear, _triton_supports, triton_quantized)


def available_backends() -> list[str]:
    """Backend names that can be chosen here (besides "auto")."""
    return sorted(_REGISTRY)


def check_backend(name: str) -> None:
    """LowvramError (one line: the reason and the choices) unless name is "auto" or an available backend."""
    if name != "auto" and name not in available_backends():
        why = f" ({gemm.TRITON_ERROR})" if name == "triton" and gemm.TRITON_ERROR else ""
        raise LowvramError(f"unknown or unavailable quantized-matmul backend {name!r}{why}; "
                           f"choose one of auto, {', '.join(available_backends())}")


def _auto(x: torch.Tensor, qweight: torch.Tensor) -> str:
    if not x.is_cuda:
        return "reference"
    if "triton" in _REGISTRY and _REGISTRY["triton"].supports(x, qweight):
        return "triton"
    name = "int_mm" if qweight.dtype == torch.int8 else "scaled_mm"
    return name if _REGISTRY[name].supports(x, qweight) else "reference"


def resolve(x: torch.Tensor, qweight: torch.Tensor, name: str = "auto") -> Backend:
    """The backend that runs this call: `name` (a QuantLinear's `backend`) if it supports the shapes and
    device, else reference; "auto" picks by device and scheme (module docstring)."""
    if name == "auto":
        name = _auto(x, qweight)
    backend = _REGISTRY.get(name)
    if backend is None or not backend.supports(x, qweight):
        return _REGISTRY["reference"]
    return backend
