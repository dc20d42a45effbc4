"""The Wan VAE's RMS norm + SiLU in one pass, written straight into a conv's padded input buffer.

The VAE's norm is `F.normalize(x, dim=C) · sqrt(C) · gamma` in fp32 (RMS_norm in
lowvram/model/vae_blocks.py), always followed by SiLU and then a causal conv. The eager code does
this in ~6 passes over an fp32 copy of every frame, in row bands (dozens of launches per norm at
704x384). Here one program reads a tile of BLOCK_W pixels x all C channels of one (b, t, h) row,
reduces the squares over C in fp32, and writes SiLU(x / max(||x||, 1e-12) · scale · gamma) in
out's dtype; x and out may have any strides (NCDHW, NDHWC, or a view inside a padded buffer).

The norm can add the producing conv's bias first (torch adds a cuDNN conv's bias in a pass of its own), and
`bias_residual_` adds a conv's bias and a residual block's shortcut in one pass (ResidualBlock's fused path).

Two arithmetics (the kernel's FAST switch, module default `FAST`): exact divisions (x / ||x||, then
SiLU as x / (1 + exp(-x)), IEEE `div_rn`, as the eager code divides), or one reciprocal per pixel
multiplied into gamma · scale and SiLU through Triton's fast division: a few instructions per element
instead of two IEEE divisions, which otherwise make the kernel instruction-bound rather than
memory-bound.

Limits: C up to 1024 (the VAE has 96..384). Not bit-equal to the eager code: the sum of squares
is reduced in another order, and exp is Triton's; the exact arithmetic agrees to fp32 rounding before
the cast to out's dtype, the fast one to a few fp32 units (tests/test_kernels_vae_norm.py), so a bf16
element differs by at most one unit either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowvram.kernels.configs import interpreting
from lowvram.kernels.fused import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin serves
    triton = None

FAST = True  # the fast arithmetic (module docstring); False: IEEE divisions
TILE = 4096  # elements of one program's [BLOCK_H = 1, BLOCK_W, BLOCK_C] tile on the GPU
INTERP_TILE = 1 << 16  # and under Triton's interpreter (several rows per program)
MAX_C = 1024
EPS = 1e-12  # F.normalize's clamp of the norm


if triton is not None:

    @triton.jit
    def _tile(T, H, W, C, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # this program's [BLOCK_H, BLOCK_W, BLOCK_C] tile: BLOCK_H rows of pixels of one (b, t) frame, all channels
        nh = tl.cdiv(H, BLOCK_H)
        r = tl.program_id(0).to(tl.int64)
        hs = (r % nh) * BLOCK_H + tl.arange(0, BLOCK_H)
        t = (r // nh) % T
        b = r // (nh * T)
        ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        cs = tl.arange(0, BLOCK_C)
        h3, w3, c3 = hs[:, None, None], ws[None, :, None], cs[None, None, :]
        return b, t, h3, w3, c3, cs, (h3 < H) & (w3 < W) & (c3 < C)

    @triton.jit
    def _norm_silu_kernel(X, G, Bv, O, T, H, W, C, sxb, sxc, sxt, sxh, sxw, sob, soc, sot, soh, sow, scale, eps,
                          BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                          FAST: tl.constexpr, HAS_BIAS: tl.constexpr):
        b, t, h3, w3, c3, cs, m = _tile(T, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C)
        xp = X + b * sxb + t * sxt + h3 * sxh + w3 * sxw + c3 * sxc
        x = tl.load(xp, mask=m, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_W, BLOCK_C]
        if HAS_BIAS:  # the producing conv's bias, added here instead of in a pass of its own (0 past C: the
            #           sums of squares stay those of the real channels; pixels past W are not stored)
            x += tl.load(Bv + cs, mask=cs < C, other=0.0).to(tl.float32)[None, None, :]
        g = tl.load(G + cs, mask=cs < C, other=0.0).to(tl.float32)
        if FAST:
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 2)), eps)  # [BLOCK_H, BLOCK_W]: one division a pixel
            y = x * inv[:, :, None] * (g * scale)[None, None, :]
            y = y / (1.0 + tl.exp(-y))  # Triton's fast fp32 division
        else:
            n = tl.maximum(tl.sqrt_rn(tl.sum(x * x, 2)), eps)  # [BLOCK_H, BLOCK_W]
            y = tl.div_rn(x, n[:, :, None]) * scale * g[None, None, :]
            y = tl.div_rn(y, 1.0 + tl.exp(-y))  # SiLU as torch's kernel: x / (1 + exp(-x))
        op = O + b * sob + t * sot + h3 * soh + w3 * sow + c3 * soc
        tl.store(op, y.to(O.dtype.element_ty), mask=m)


    @triton.jit
    def _bias_residual_kernel(Y, Bv, R, T, H, W, C, syb, syc, syt, syh, syw, srb, src, srt, srh, srw,
                              BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # Y += bias + R in fp32, one rounding to Y's dtype; the tiles of _norm_silu_kernel
        b, t, h3, w3, c3, cs, m = _tile(T, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C)
        yp = Y + b * syb + t * syt + h3 * syh + w3 * syw + c3 * syc
        y = tl.load(yp, mask=m, other=0.0).to(tl.float32)
        res = tl.load(R + b * srb + t * srt + h3 * srh + w3 * srw + c3 * src, mask=m, other=0.0).to(tl.float32)
        bias = tl.load(Bv + cs, mask=cs < C, other=0.0).to(tl.float32)
        tl.store(yp, (y + bias[None, None, :] + res).to(Y.dtype.element_ty), mask=m)


def norm_silu_torch(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor,
                    bias: torch.Tensor | None = None) -> None:
    """The eager arithmetic on the whole tensor at once (the CPU fallback); bias added in fp32 first."""
    # x, out: [B, C, T, H, W]; gamma, bias: C elements
    xf = x.float() if bias is None else x.float() + bias.float().reshape(1, -1, 1, 1, 1)
    y = F.normalize(xf, dim=1).mul_(scale).mul_(gamma.float().reshape(1, -1, 1, 1, 1))
    out.copy_(F.silu(y, inplace=True))


def _tiles(c: int, h: int, w: int, channels_contiguous: bool, tile: int = TILE) -> tuple[int, int, int, int]:
    block_c = triton.next_power_of_2(c)
    # channels-last: a pixel's C values are one contiguous run; otherwise take >= 32 pixels of a row
    # so each channel's loads are 64 contiguous bytes (bf16)
    block_w = max(1, tile // block_c) if channels_contiguous else max(32, tile // block_c)
    block_w = min(block_w, triton.next_power_of_2(w))
    block_h = 1
    if interpreting():  # the interpreter runs programs one by one: few large ones are faster
        block_w = triton.next_power_of_2(w)
        block_h = max(1, min(triton.next_power_of_2(h), INTERP_TILE // (block_w * block_c)))
    return block_h, block_w, block_c, 8 if block_w * block_c > 4096 else 4


def norm_silu_into(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor,
                   backend: str = "auto", fast: bool | None = None, tile: int = TILE,
                   bias: torch.Tensor | None = None) -> None:
    """out[:] = SiLU(x / max(||x||_C, 1e-12) · scale · gamma), computed in fp32, cast to out's dtype; with `bias`
    (C elements, the producing conv's) x + bias in fp32 in place of x.

    x: [B, C, T, H, W] of any strides; out: the same shape, any strides (a view into a padded
    buffer is the intended use); gamma: C elements (any shape that flattens to C).
    backend: "auto" (kernel on CUDA, torch elsewhere), "triton", "torch". fast: the kernel's arithmetic
    (default `FAST`); tile: elements of a program's tile on the GPU (default `TILE`).
    """
    if x.shape != out.shape or x.ndim != 5:
        raise ValueError(f"norm_silu_into needs x and out of one 5-D shape, got {list(x.shape)} and {list(out.shape)}")
    b, c, t, h, w = x.shape
    if bias is not None and bias.numel() != c:
        raise ValueError(f"bias has {bias.numel()} elements for {c} channels")
    if not use_triton(x, backend) or c > MAX_C:
        norm_silu_torch(x, gamma, scale, out, bias)
        return
    if x.numel() == 0:
        return
    g = gamma.reshape(-1)
    if g.numel() != c:
        raise ValueError(f"gamma has {g.numel()} elements for {c} channels")
    block_h, block_w, block_c, warps = _tiles(c, h, w, x.stride(1) == 1, tile)
    grid = (b * t * triton.cdiv(h, block_h), triton.cdiv(w, block_w))
    bv = g if bias is None else bias.reshape(-1).contiguous()
    _norm_silu_kernel[grid](x, g.contiguous(), bv, out, t, h, w, c, *x.stride(), *out.stride(), float(scale), EPS,
                            BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, FAST=FAST if fast is None else fast,
                            HAS_BIAS=bias is not None, num_warps=warps)


def bias_residual_(y: torch.Tensor, bias: torch.Tensor, res: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y += bias + res in one pass (fp32 sum, one rounding to y's dtype): a conv's bias and a residual block's
    shortcut, which torch would add in two passes of two roundings. y, res: [B, C, T, H, W], any strides;
    bias: C elements. Returns y."""
    if y.shape != res.shape or y.ndim != 5:
        raise ValueError(f"bias_residual_ needs y and res of one 5-D shape, got {list(y.shape)} and {list(res.shape)}")
    b, c, t, h, w = y.shape
    if bias.numel() != c:
        raise ValueError(f"bias has {bias.numel()} elements for {c} channels")
    if not use_triton(y, backend) or c > MAX_C:
        y.copy_(y.float() + bias.float().reshape(1, -1, 1, 1, 1) + res.float())
        return y
    if y.numel() == 0:
        return y
    block_h, block_w, block_c, warps = _tiles(c, h, w, y.stride(1) == 1)
    grid = (b * t * triton.cdiv(h, block_h), triton.cdiv(w, block_w))
    _bias_residual_kernel[grid](y, bias.reshape(-1).contiguous(), res, t, h, w, c, *y.stride(), *res.stride(),
                                BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
    return y


def cuda_ms(fn, iters: int = 20, warmup: int = 1) -> float:
    """Mean ms per call of fn() on the current CUDA stream (CUDA events around `iters` calls after `warmup`)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def bench_norm_silu(shape=(1, 96, 4, 384, 704), dtype=torch.bfloat16, channels_last: bool = True,
                    iters: int = 20, tiles=(4096, 8192, 16384)) -> dict:
    """ms per call (and GB/s of the bytes read and written) of the torch twin and of the kernel with each
    arithmetic and tile size, on one CUDA tensor of `shape` written into a padded buffer."""
    b, c, t, h, w = shape
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    buf = torch.zeros((b, c, t + 2, h + 2, w + 2), device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    out = buf[:, :, 2:, 1:-1, 1:-1]
    gamma = torch.rand(c, device="cuda", dtype=dtype) + 0.5
    fns = {"torch": lambda: norm_silu_torch(x, gamma, c ** 0.5, out)}
    for fast in (False, True):
        for tile in tiles:
            fns[f"{'fast' if fast else 'exact'}_{tile}"] = (
                lambda fast=fast, tile=tile: norm_silu_into(x, gamma, c ** 0.5, out, "triton", fast, tile))
    res = {}
    for name, fn in fns.items():
        ms = cuda_ms(fn, iters)
        res[name] = {"ms": round(ms, 4), "GB/s": round(2 * x.numel() * x.element_size() / ms / 1e6)}
    return res
