"""The INT8 step caches' quantization and dequantization in one pass each (issue 15): per (token, head) rows of
head_dim values, by kernels/rowquant.py's rule, bit-identical to its torch functions.

The streamed profiles keep their step caches in host memory as INT8 (runtime.kv_cache, KVFormat.INT8). Per layer
and sample of a batched call, the copy stream dequantizes a fetched window (~9500 tokens) into the bf16 slot, and the
write-back stream quantizes the forward's new chunk (3168 tokens) for the host: at full size 160 windows and 160
chunks a call. In torch the dequantization is one mixed-dtype multiply (int8 x fp32 -> bf16, TensorIterator's
dynamically casting loop) and the quantization eight passes over fp32 temporaries; both run beside the DiT on the
same SMs and HBM. Here each is one kernel that reads its input once and writes its outputs once, from and into
the strided views the caches use (a slot's token range, the staging and write-back buffers), so no copy is made.

Quantization (`quantize_tokens_int8`): x [B, n, H, D] into q and scales [B, n, H] of any strides, one program per
(32 tokens, head, sample); it also serves the 8-bit attention's caches (attention8.kv8_write: K smoothed by its mean,
V and both scales stored token-contiguous). `quantize_heads_int8` takes [..., T, H, D] views whose leading dims merge.
Dequantization (`dequantize_heads`): q [..., T, H, D] (H, D contiguous; leading dims that merge, any strides for
them and T) and scales [..., T, H] into out of q's shape, one program per (token, sample): its [H, D] tile, each
head a row.
"""

from __future__ import annotations

import torch

from lowvram.kernels.rowquant import INT8_MAX, dequantize_rows, quantize_rows_int8

try:
    import triton
    import triton.language as tl

    from lowvram.kernels.rowquant import _INTERPRETED, quantize_tile
except ImportError:  # CPU-only installs: the torch functions
    triton = None


def _check(x: torch.Tensor, scale: torch.Tensor, name: str) -> None:  # dequantize_heads' layout
    if x.dim() < 3 or x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        raise ValueError(f"{name} must be [..., T, H, D] with H and D contiguous, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if scale.shape != x.shape[:-1] or scale.stride(-1) != 1:
        raise ValueError(f"the scales must be [..., T, H] = {tuple(x.shape[:-1])} with H contiguous, got shape "
                         f"{tuple(scale.shape)} strides {scale.stride()}")


def kernel_usable(x: torch.Tensor) -> bool:
    """Whether the kernels run for x: a CUDA tensor with Triton installed (the CPU keeps the torch functions)."""
    return triton is not None and x.is_cuda


def _torch_into(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """rowquant's torch quantization of x's rows, copied into q and scale (views of larger buffers)."""
    qq, ss = quantize_rows_int8(x)
    q.copy_(qq)
    scale.copy_(ss)


def _samples(t: torch.Tensor, tail: int) -> torch.Tensor:
    """t [..., *last `tail` dims] as [N, *those] without a copy (a ValueError where its strides do not allow one:
    the kernel would otherwise write into a temporary)."""
    try:
        return t.view(-1, *t.shape[t.dim() - tail:]) if t.dim() != tail + 1 else t
    except RuntimeError as e:
        raise ValueError(f"a [..., T, H, D] view whose leading dims cannot merge: shape {tuple(t.shape)} strides "
                         f"{t.stride()} ({e})") from None


def quantize_heads_int8(x: torch.Tensor, q: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rowquant.quantize_rows_int8 of x [..., T, H, D] (rows of D), written into q (int8, x's shape) and scale (fp32,
    x's shape without D) where given (views of larger buffers are fine), else into new tensors; returns (q, scale).
    kernel: None runs the Triton kernel (quantize_tokens_int8's) on CUDA (kernel_usable), True also under the
    interpreter, False the torch functions."""
    kernel = kernel_usable(x) if kernel is None else kernel
    if q is None:
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if scale is None:
        scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if not kernel:
        _torch_into(x, q, scale)
        return q, scale
    if x.dim() < 3 or q.shape != x.shape or scale.shape != x.shape[:-1]:
        raise ValueError(f"quantize_heads_int8: x [..., T, H, D] {tuple(x.shape)} needs q of its shape and scales "
                         f"{tuple(x.shape[:-1])}; got {tuple(q.shape)}, {tuple(scale.shape)}")
    quantize_tokens_int8(_samples(x, 3), _samples(q, 3), _samples(scale, 2), kernel=True)
    return q, scale


def dequantize_heads(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                     kernel: bool | None = None) -> torch.Tensor:
    """rowquant.dequantize_rows(q, scale, out=out): q [..., T, H, D] int8 times scale [..., T, H] in fp32, rounded
    into out (bf16 or fp32, q's shape; a view of a slot is fine). kernel: as quantize_heads_int8."""
    kernel = kernel_usable(q) if kernel is None else kernel
    if not kernel:
        return dequantize_rows(q, scale, out=out)
    _check(q, scale, "q")
    _check(out, scale, "out")
    q4, s3, o4 = _samples(q, 3), _samples(scale, 2), _samples(out, 3)
    N, T, H, D = q4.shape
    if T and N:
        _dequant_heads[(T, N)](q4, s3, o4, *q4.stride()[:2], *s3.stride()[:2], *o4.stride()[:2],
                               H=H, D=D, HB=triton.next_power_of_2(H), DB=triton.next_power_of_2(D), num_warps=4)
    return out


def quantize_tokens_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None = None,
                         kernel: bool | None = None) -> None:
    """rowquant.quantize_rows_int8 of x [B, n, H, D] (minus mean [B, H, D] fp32, for the 8-bit attention's smoothed
    K) into q [B, n, H, D] int8 and scale [B, n, H] fp32: views with any strides, e.g. a KV8Cache's token-contiguous
    V [B, H, D, L] and scales [B, H, L] permuted to these shapes. One program per (32 tokens, head, sample): rows
    along D, stored along either layout. kernel: as quantize_heads_int8."""
    kernel = kernel_usable(x) if kernel is None else kernel
    if x.dim() != 4 or q.shape != x.shape or scale.shape != x.shape[:-1] or (mean is not None and mean.shape != (
            x.shape[0], x.shape[2], x.shape[3])):
        raise ValueError(f"quantize_tokens_int8: x {tuple(x.shape)} needs q of its shape, scales {tuple(x.shape[:-1])}"
                         f" and a mean of [B, H, D]; got {tuple(q.shape)}, {tuple(scale.shape)}"
                         f"{'' if mean is None else ', ' + str(tuple(mean.shape))}")
    if not kernel:
        _torch_into(x.float() - mean[:, None] if mean is not None else x, q, scale)
        return
    B, n, H, D = x.shape
    if n and B:
        m = mean.contiguous() if mean is not None else scale  # (a dummy pointer when there is no mean)
        _quant_tokens[(triton.cdiv(n, TOKENS), H, B)](x, q, scale, m, n, *x.stride(), *q.stride(), *scale.stride(),
                                                       H=H, D=D, DB=triton.next_power_of_2(D), TB=TOKENS,
                                                       MEAN=mean is not None, QMAX=INT8_MAX, num_warps=4)


TOKENS = 32  # tokens per program of quantize_tokens_int8: 32 bytes along a token-contiguous layout per store


if triton is not None:

    @triton.jit
    def _quant_tokens(x, q, s, mean, n, sxb, sxt, sxh, sxd, sqb, sqt, sqh, sqd, ssb, sst, ssh,
                      H: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, TB: tl.constexpr, MEAN: tl.constexpr,
                      QMAX: tl.constexpr):
        t = tl.program_id(0).to(tl.int64) * TB + tl.arange(0, TB).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        d = tl.arange(0, DB)
        m = (t[:, None] < n) & (d[None, :] < D)
        tile = tl.load(x + b * sxb + t[:, None] * sxt + h * sxh + d[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        if MEAN:  # fp32 [D] of this (sample, head), one subtraction per element as torch's x.float() - mean
            mu = tl.load(mean + (b * H + h) * D + d, mask=d < D, other=0.0)
            tile = tl.where(m, tile - mu[None, :], 0.0)
        qt, sc = quantize_tile(tile, QMAX, False, tl.int8)
        tl.store(q + b * sqb + t[:, None] * sqt + h * sqh + d[None, :] * sqd, qt, mask=m)
        tl.store(s + b * ssb + t * sst + h * ssh, sc, mask=t < n)

    @triton.jit
    def _dequant_heads(q, s, o, sqn, sqt, ssn, sst, son, sot,
                       H: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, DB: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1).to(tl.int64)
        h = tl.arange(0, HB)
        d = tl.arange(0, DB)
        m = (h[:, None] < H) & (d[None, :] < D)
        hd = h[:, None] * D + d[None, :]
        qt = tl.load(q + i * sqn + t * sqt + hd, mask=m, other=0).to(tl.float32)
        sc = tl.load(s + i * ssn + t * sst + h, mask=h < H, other=0.0)
        y = qt * sc[:, None]
        if _INTERPRETED:  # (a compile-time branch: the GPU's cast rounds to nearest even itself)
            if o.dtype.element_ty == tl.bfloat16:  # the interpreter's cast truncates: round to nearest even by
                bits = y.to(tl.int32, bitcast=True)  # hand first (finite values), after which it is exact
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
                y = bits.to(tl.float32, bitcast=True)
        tl.store(o + i * son + t * sot + hd, y.to(o.dtype.element_ty), mask=m)
