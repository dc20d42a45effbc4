"""Quantize once, feed many: one 8-bit copy of an activation for every QuantLinear that reads it, and the FFN with
its GELU in the first GEMM's epilogue (issue 15).

Every W8A8 backend quantizes its input per token by kernels/rowquant.py's rule, so layers of one scheme that read
the same x can share one rowquant.QuantRows of it (self_attn.q/k/v; cross-attention's k/v of the context; a
norm's output, written by kernels/fused.py's layer_norm_mod_quant) and each gets the bits of quantizing x itself.
Where sharing cannot give today's bits (a bf16 nn.Linear, schemes that differ, the weight-only reference backend,
which "auto" runs on the CPU) `input_scheme` says None and callers keep the unfused path.

The FFN (`ffn`): ffn.0 on our GEMM with tanh-GELU and each row's absmax in its epilogue (gemm.gelu_linear), then
ffn.2's quantization in one pass from that absmax. Versus ffn.0 -> nn.GELU -> ffn.2 this saves the GELU's read
and write of the [tokens, ffn_dim] hidden and the quantizer's reduction. Quantizing ffn.2's A tiles inside its GEMM
instead would redo the rounding once per N tile (5120 / BLOCK_N = 20 times) in the tensor-core loop and read the
hidden in bf16 there, for the one 3-byte pass it saves. The GELU's tanh may differ from torch's in its last fp32
bits: an element of the hidden then moves by one bf16 unit (gemm.gelu_linear), and its row's codes with it.

`GELU_EPILOGUE` is off: on the H200 the FFN with the epilogue ran 0.83-0.87x the separate GEMM -> GELU ->
quantize (tools/bench_block.py, INT8 and FP8, B 1 and 4; the epilogue's GELU and row absmax cost the GEMM more
than the pass they save), so ffn.0 reads its norm's shared 8-bit input and writes its bf16 hidden, and the GELU
runs inside ffn.2's quantization kernel instead (`_gelu_in_quantization`): no GELU pass of its own. There it is
computed as x * sigmoid(2u) (configs.GELU_FORM): on the H200 at B = 4 (12672 x 13824) the quantization with
libdevice's tanhf took 0.48 ms, more than torch's GELU pass plus the plain quantization (0.33 ms); with the sigmoid
form 0.21-0.24 ms (BENCHMARKS.md section 5).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lowvram.kernels import gemm
from lowvram.kernels.rowquant import QuantRows
from lowvram.quantize.backends import resolve
from lowvram.quantize.linear import QuantLinear

GELU_EPILOGUE = False  # the FFN's GELU in ffn.0's epilogue (module docstring: measured slower on the H200)


def _on(x) -> torch.Tensor:  # a tensor on x's device (the backends choose by device)
    return x.q if isinstance(x, QuantRows) else x


def input_scheme(x, layers) -> str | None:
    """The scheme ("int8" or "fp8") in which every one of `layers` can read one quantized copy of x [..., K] (a
    tensor or QuantRows): each is a QuantLinear of that scheme whose backend for x's device is a W8A8 one.
    None otherwise (an nn.Linear among them, two schemes, the reference backend)."""
    if not layers or not all(isinstance(m, QuantLinear) for m in layers):
        return None
    schemes = {m.scheme for m in layers}
    if len(schemes) != 1 or any(resolve(_on(x), m.qweight, m.backend).quantized is None for m in layers):
        return None
    return schemes.pop()


def quantize_input(x: torch.Tensor, fp8: bool, backend: str = "auto") -> QuantRows:
    """x [..., K] -> its QuantRows: gemm.quantize_rows' kernel on CUDA ("triton": also on the CPU under the
    interpreter), rowquant's torch functions elsewhere ("torch"); the same bits either way
    (tests/test_kernels_rowquant.py)."""
    kernel = backend == "triton" or (backend == "auto" and x.is_cuda and gemm.triton_usable(x))
    if not kernel:
        return QuantRows.of(x, fp8)
    q, s = gemm.quantize_rows(x.reshape(-1, x.shape[-1]), fp8=fp8)
    return QuantRows(q, s, tuple(x.shape), x.dtype)


def _kernel_quantizes(x: torch.Tensor, layers) -> bool:
    """Whether gemm.quantize_rows (our kernel) quantizes x for `layers`: on CUDA, or where they all name the triton
    backend (the interpreter on the CPU)."""
    return (all(m.backend == "triton" for m in layers) or x.is_cuda) and gemm.triton_usable(x)


def quantize_parts(parts: list, layers, shape: tuple | None = None) -> QuantRows | None:
    """The QuantRows of torch.cat(parts) (parts [M_i, K], the rows of one activation in order) for `layers`, each
    part quantized by our kernel straight into its rows of one buffer, so the concatenation is never made (the
    per-sample attention outputs of a batched call, read by the o projection); the same bits, rows being
    independent. shape: the activation's shape (default [sum M_i, K]). None where the layers cannot share a
    quantized input or the kernel does not run for them (callers then concatenate)."""
    scheme = input_scheme(parts[0], layers)
    if scheme is None or not _kernel_quantizes(parts[0], layers):
        return None
    k, fp8 = parts[0].shape[-1], scheme == "fp8"
    m = sum(p.shape[0] for p in parts)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=parts[0].device)
    s = torch.empty(m, dtype=torch.float32, device=parts[0].device)
    a = 0
    for p in parts:
        gemm.quantize_rows(p, fp8=fp8, out=(q[a:a + p.shape[0]], s[a:a + p.shape[0]]))
        a += p.shape[0]
    return QuantRows(q, s, shape or (m, k), parts[0].dtype)


def shared(x, layers):
    """x as `layers` (which all read it) will take it: its one quantized copy when they can share it, else x
    itself (already QuantRows, or not shareable)."""
    if isinstance(x, QuantRows):
        return x
    scheme = input_scheme(x, layers)
    return x if scheme is None else quantize_input(x, scheme == "fp8")


def _tanh_gelu(act: nn.Module) -> bool:
    """Whether act is nn.GELU(approximate="tanh"), the GELU our kernels compute."""
    return isinstance(act, nn.GELU) and act.approximate == "tanh"


def _gelu_in_quantization(seq: nn.Sequential, x):
    """ffn.0, then GELU inside ffn.2's per-token quantization (gemm.quantize_rows(gelu=True)): the hidden is read
    once in bf16 and written once in 8 bits, against the GELU pass's read and write plus the quantizer's read. Where
    ffn.2 quantizes by our kernel only (a W8A8 backend on a device where quantize_input runs it), else seq(x)."""
    first, act, second = seq
    if not _tanh_gelu(act):
        return seq(x)
    h = first(x)
    if h.dtype != torch.bfloat16 or input_scheme(h, [second]) is None or not _kernel_quantizes(h, [second]):
        return second(act(h))
    q, s = gemm.quantize_rows(h.reshape(-1, h.shape[-1]), fp8=second.scheme == "fp8", gelu=True)
    return second(QuantRows(q, s, tuple(h.shape), h.dtype))


def _gelu_fusable(seq: nn.Sequential, x) -> bool:
    first, act, second = seq
    return (_tanh_gelu(act) and isinstance(first, QuantLinear)
            and resolve(_on(x), first.qweight, first.backend).name == "triton"
            and input_scheme(x, [second]) is not None)


def ffn(seq: nn.Sequential, x):
    """nn.Sequential(Linear, GELU(tanh), Linear) on x [..., C] or its QuantRows -> [..., C]. By default the GELU runs
    inside ffn.2's quantization where ffn.2 is a W8A8 layer (`_gelu_in_quantization`); with GELU_EPILOGUE, ffn.0 a
    QuantLinear on the Triton backend (for FP8: on our GEMM, gemm.fp8_engine) and ffn.2 one on a W8A8 backend, it
    runs in ffn.0's epilogue and ffn.2 reads the hidden quantized in one pass (module docstring); else seq(x)."""
    if len(seq) != 3:
        return seq(x)
    if not GELU_EPILOGUE:
        return _gelu_in_quantization(seq, x)
    if not _gelu_fusable(seq, x):
        return seq(x)
    first, act, second = seq
    xr = x if isinstance(x, QuantRows) else quantize_input(x, first.scheme == "fp8")
    if xr.scheme != first.scheme or (first.scheme == "fp8" and gemm.fp8_engine(xr.q, first.qweight) != "triton"):
        return second(act(first(xr)))  # (a mismatched scheme raises there, as it would unfused)
    g, amax = gemm.gelu_linear(xr.q, xr.scale, first.qweight, first.scale, first.bias)  # [M, F] bf16, [M]
    q, s = gemm.quantize_rows(g, fp8=second.scheme == "fp8", amax=amax)
    return second(QuantRows(q, s, tuple(xr.shape[:-1]) + (g.shape[-1],), g.dtype))
