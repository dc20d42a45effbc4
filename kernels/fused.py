"""Row-wise fused kernels for the DiT block's elementwise work (one pass over a token row each).

The eager block converts, normalises, modulates, ropes and gates [tokens, 5120] activations in
a dozen separate fp32/bf16 passes per step (trace_forward: ~45% of a full-size forward's GPU
time on an H200 was copies and elementwise kernels). Each kernel here does one of those chains
in one pass, computing in fp32 and rounding exactly where the eager code rounds:

- `rms_norm_rope`: WanRMSNorm (fp32 mean of squares, round, times the weight in bf16) and, with
  (cos, sin) given, the interleaved-pair RoPE of every head (fp32, one rounding).
- `layer_norm_mod`: WanLayerNorm (fp32, optional affine, optionally on an input first rounded to
  bf16; rounded to its input's dtype) then per-frame `h * (1 + scale) + shift`.
  `layer_norm_mod_quant` also (or only) writes the next GEMM's input: the row rounded to out_dtype, then
  quantized by kernels/rowquant.py's rule (rowquant.QuantRows), bit-identical to layer_norm_mod followed
  by kernels.gemm.quantize_rows, with no second pass over the row. `add_layer_norm_mod` normalises x + y
  (the block's residual of the cross-attention, written once) in the same pass, and `gated_layer_norm_mod`
  normalises x + y * gate (the self-attention's gated residual, in fp32) in the same way.
- `ada_layer_norm`: the audio injector's AdaLayerNorm after its linear (an fp32 LayerNorm, not rounded, times
  (1 + scale) rounded to the compute dtype, plus shift), through the same kernel, also with the quantized rows.
- `gated_residual`: x + y * gate[frame] in fp32, written in the output dtype (`gated_residual_rows`: some rows
  of it, into a given output).

Each has a torch twin (the eager code) for CPU runs; results agree to fp32 reduction order.
Rows: the last dim must be contiguous; the row length C up to 16384.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowvram.kernels import configs
from lowvram.kernels.reference import rope_apply
from lowvram.kernels.rowquant import FP8_MAX, INT8_MAX, QuantRows

try:
    import triton
    import triton.language as tl

    from lowvram.kernels.rowquant import round_8bit, scale_of
except ImportError:  # CPU-only installs: the torch twins serve
    triton = None


def use_triton(x: torch.Tensor, backend: str) -> bool:
    """backend "auto": the kernels on CUDA, the torch twins elsewhere; "triton": the kernels (on the CPU
    through Triton's interpreter, for tests); "torch": the twins."""
    if backend == "torch" or triton is None and backend == "auto":
        return False
    if backend == "auto":
        return x.is_cuda
    if backend != "triton":
        raise ValueError(f"backend must be auto, triton or torch, not {backend!r}")
    if triton is None or not (x.is_cuda or configs.interpreter_ready()):
        raise RuntimeError("the fused kernels need triton on a CUDA device or under TRITON_INTERPRET=1")
    return True


def _warps(block: int) -> int:
    # one row per program: at the model's width (C 5120, BLOCK 8192) and a batch's 12672 rows 4 warps ran every
    # row kernel fastest on the H200 (norm + FP8 rows 0.133 ms against 0.168 with 16, the residual-add norm 0.235
    # against 0.269, RMSNorm + RoPE 0.089 against 0.104; 8 and 32 in between or slower; BENCHMARKS.md section 5)
    return 4 if block <= 8192 else 16


if triton is not None:

    @triton.jit
    def _rms_rope_kernel(X, W, COS, SIN, O, sx, so, C, L, eps,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
        y = (x * r).to(O.dtype.element_ty).to(tl.float32)  # the norm rounds to the input dtype
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        y = (y * w).to(O.dtype.element_ty)  # then the product with the weight, rounded again
        if ROPE:
            tok = row % L
            pair = tl.arange(0, BLOCK // 2)
            i = pair % HALF  # frequency index within the head
            pm = pair < C // 2
            c = tl.load(COS + tok * HALF + i, mask=pm, other=0.0).to(tl.float32)
            s = tl.load(SIN + tok * HALF + i, mask=pm, other=0.0).to(tl.float32)
            a, b = tl.split(tl.reshape(y.to(tl.float32), (BLOCK // 2, 2)))
            y = tl.reshape(tl.join(a * c - b * s, a * s + b * c), (BLOCK,)).to(O.dtype.element_ty)
        tl.store(O + row * so + cols, y, mask=m)

    @triton.jit
    def _ln_mod_kernel(X, W, B, SHIFT, SCALE, O, Q, S, sx, so, C, rows_per_frame, eps,
                       BLOCK: tl.constexpr, ROUND_IN: tl.constexpr, AFFINE: tl.constexpr,
                       MOD: tl.constexpr, STORE_H: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                       FP8: tl.constexpr, Y=None, XS=None, sy=0, ADD: tl.constexpr = False,
                       ROUND_H: tl.constexpr = True, ONE_PLUS: tl.constexpr = True, G=None, GATE: tl.constexpr = False):
        # QUANT: Q [rows, C] and S [rows] get the row rounded to O's dtype and quantized (rowquant's rule);
        # STORE_H: O gets that row too; ADD: the row normalized is X + Y (Y's row promoted to X's dtype, as the
        # eager sum), stored in XS (contiguous rows, X's dtype); ROUND_H False: the normalized row stays fp32 (a
        # LayerNorm of an fp32 copy); ONE_PLUS False: SCALE holds the factor itself (h * SCALE + SHIFT); GATE (with
        # ADD): the row is X + Y * G[frame] in fp32 (gated_residual's), stored in XS as fp32
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(X + row * sx + cols, mask=m, other=0.0)
        if GATE:
            y = tl.load(Y + row * sy + cols, mask=m, other=0.0).to(tl.float32)
            g = tl.load(G + (row // rows_per_frame) * C + cols, mask=m, other=0.0)
            x = x.to(tl.float32) + y * g
            tl.store(XS + row * C + cols, x, mask=m)
        elif ADD:
            x = x + tl.load(Y + row * sy + cols, mask=m, other=0.0).to(x.dtype)
            tl.store(XS + row * C + cols, x, mask=m)
        if ROUND_IN:
            x = x.to(tl.bfloat16)
        x = x.to(tl.float32)
        mean = tl.sum(x, 0) / C
        d = tl.where(m, x - mean, 0.0)
        h = d / tl.sqrt(tl.sum(d * d, 0) / C + eps)
        if AFFINE:
            h = h * tl.load(W + cols, mask=m, other=0.0).to(tl.float32) + tl.load(B + cols, mask=m, other=0.0).to(
                tl.float32)
        if ROUND_IN:  # WanLayerNorm returns its input's dtype: bf16 here, x's dtype otherwise
            h = h.to(tl.bfloat16).to(tl.float32)
        elif ROUND_H:
            h = h.to(X.dtype.element_ty).to(tl.float32)
        if MOD:
            bf = row // rows_per_frame  # (batch, frame) index into [B, F, C] shift/scale
            sc = tl.load(SCALE + bf * C + cols, mask=m, other=0.0)
            sh = tl.load(SHIFT + bf * C + cols, mask=m, other=0.0)
            if ONE_PLUS:
                sc = 1.0 + sc
            h = h * sc + sh
        h = h.to(O.dtype.element_ty)
        if STORE_H:
            tl.store(O + row * so + cols, h, mask=m)
        if QUANT:  # the rounded row, as kernels.gemm.quantize_rows would read it back
            hf = tl.where(m, h.to(tl.float32), 0.0)
            scale, inv = scale_of(tl.max(tl.abs(hf), 0), QMAX)
            tl.store(Q + row * C + cols, round_8bit(hf * inv, QMAX, FP8, Q.dtype.element_ty), mask=m)
            tl.store(S + row, scale)

    @triton.jit
    def _rope_kernel(X, COS, SIN, O, sx, so, C, L, HALF: tl.constexpr, BLOCK: tl.constexpr):
        # one token row of C = H * D channels; pairs (2i, 2i + 1) of every head rotated by the token's (cos, sin)
        row = tl.program_id(0)
        tok = row % L
        pair = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        pm = pair < C // 2
        i = pair % HALF  # frequency index within the head
        a = tl.load(X + row * sx + 2 * pair, mask=pm, other=0.0).to(tl.float32)
        b = tl.load(X + row * sx + 2 * pair + 1, mask=pm, other=0.0).to(tl.float32)
        c = tl.load(COS + tok * HALF + i, mask=pm, other=0.0).to(tl.float32)
        s = tl.load(SIN + tok * HALF + i, mask=pm, other=0.0).to(tl.float32)
        # bf16 x fp16 products are exact in fp32, so each sum is rounded once, as rope_apply's
        tl.store(O + row * so + 2 * pair, (a * c - b * s).to(O.dtype.element_ty), mask=pm)
        tl.store(O + row * so + 2 * pair + 1, (a * s + b * c).to(O.dtype.element_ty), mask=pm)

    @triton.jit
    def _gate_kernel(X, Y, G, O, sx, sy, so, C, rows_per_frame, row0, BLOCK: tl.constexpr):
        # rows of X, Y, O are the batch's rows row0, row0 + 1, ...: G's row (the frame) counts from row0
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + row * sy + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + ((row + row0) // rows_per_frame) * C + cols, mask=m, other=0.0)
        tl.store(O + row * so + cols, (x + y * g).to(O.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, C] view with a contiguous last dim (copying only when it must)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    return x2


# ------------------------------------------------------------------- torch twins (the eager code)

def rms_norm_rope_torch(x, weight, eps, cos=None, sin=None, heads=1):
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    if cos is None:
        return y
    b, L, c = y.shape
    return rope_apply(y.view(b, L, heads, c // heads), cos, sin).view(b, L, c)


def layer_norm_mod_torch(x, eps, weight=None, bias=None, shift=None, scale=None, frames=1, round_in=False,
                         out_dtype=None):
    out_dtype = out_dtype or x.dtype
    if round_in:
        x = x.to(torch.bfloat16)
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    h = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype).float()
    if shift is not None:  # shift/scale [B, F, C]
        h = (h.unflatten(1, (frames, -1)) * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)
    return h.to(out_dtype)


def gated_residual_torch(x, y, gate, frames, out_dtype=None):
    out = x + (y.float().unflatten(1, (frames, -1)) * gate[:, :, None]).flatten(1, 2)
    return out.to(out_dtype or out.dtype)


# ------------------------------------------------------------------- public entry points

def rms_norm_rope(x, weight, eps, cos=None, sin=None, heads=1, backend="auto"):
    """RMSNorm(x) * weight over the last dim of x [..., C]; with (cos, sin) [L, D/2] given, x is [B, L, C]
    and each of its `heads` heads of D = C / heads channels is then roped. Returns x.dtype, x's shape."""
    if (not use_triton(x, backend) or weight.dtype != x.dtype or (cos is not None and x.dtype == torch.float32)):
        # (a weight of another dtype promotes in the eager code; fp32 RoPE rotates in float64 there)
        return rms_norm_rope_torch(x, weight, eps, cos, sin, heads)
    c = x.shape[-1]
    L = x.shape[-2] if cos is not None else 1
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(c)
    rope = cos is not None
    cos = cos.contiguous() if rope else weight
    sin = sin.contiguous() if rope else weight
    _rms_rope_kernel[(x2.shape[0],)](x2, weight, cos, sin, out, x2.stride(0), c, c, L, eps,
                                     HALF=(c // heads) // 2 if rope else 1, BLOCK=block, ROPE=rope,
                                     num_warps=_warps(block))
    return out


def layer_norm_mod(x, eps, weight=None, bias=None, shift=None, scale=None, frames=1, round_in=False,
                   out_dtype=None, backend="auto"):
    """WanLayerNorm of x [B, L, C] (fp32, rounded to its input's dtype; `round_in`: of x rounded to bf16
    first; affine if weight is given), then with shift/scale [B, F, C] (fp32) the per-frame modulation
    h * (1 + scale) + shift over F frames of L / F tokens. Returns out_dtype (x.dtype by default)."""
    if not use_triton(x, backend):
        return layer_norm_mod_torch(x, eps, weight, bias, shift, scale, frames, round_in, out_dtype)
    return _ln_mod(x, eps, weight, bias, shift, scale, frames, round_in, out_dtype, True, None)[0]


def _ln_mod(x, eps, weight, bias, shift, scale, frames, round_in, out_dtype, keep_h: bool, fp8: bool | None,
            add=None, round_h: bool = True, one_plus: bool = True, gate=None):
    # the kernel's launch -> (h [B, L, C] or None, (q [B*L, C], scale [B*L]) or None, x + add [B, L, C] or None;
    # with gate [B, F, C], x + add * gate in fp32)
    b, L, c = x.shape
    x2 = _rows(x)
    xs, extra = None, {}
    if add is not None:
        y2 = _rows(add)
        xs = torch.empty(b, L, c, dtype=x.dtype if gate is None else torch.float32, device=x.device)
        extra = dict(Y=y2, XS=xs, sy=y2.stride(0), ADD=True)
        if gate is not None:
            extra.update(G=gate.contiguous().float(), GATE=True)
    dt = out_dtype or x.dtype
    # without h: a one-element O stands for its dtype (never written)
    out = torch.empty((b, L, c) if keep_h else (1,), dtype=dt, device=x.device)
    quant = fp8 is not None
    q = torch.empty(b * L, c, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device) if quant else out
    s = torch.empty(b * L, dtype=torch.float32, device=x.device) if quant else out
    block = triton.next_power_of_2(c)
    mod = shift is not None
    dummy = x2
    sh = shift.contiguous().float() if mod else dummy
    sc = scale.contiguous().float() if mod else dummy
    _ln_mod_kernel[(x2.shape[0],)](x2, weight if weight is not None else dummy, bias if bias is not None else dummy,
                                   sh, sc, out, q, s, x2.stride(0), c, c, L // frames, eps, BLOCK=block,
                                   ROUND_IN=round_in, AFFINE=weight is not None, MOD=mod, STORE_H=keep_h,
                                   QUANT=quant, QMAX=FP8_MAX if fp8 else INT8_MAX, FP8=bool(fp8),
                                   ROUND_H=round_h, ONE_PLUS=one_plus, num_warps=_warps(block), **extra)
    return (out if keep_h else None), ((q, s) if quant else None), xs


def layer_norm_mod_quant(x, eps, weight=None, bias=None, shift=None, scale=None, frames=1, round_in=False,
                         out_dtype=None, fp8=False, keep_h=False, backend="auto"):
    """layer_norm_mod (the same arguments) whose rows also come out quantized for the next W8A8 GEMM (INT8, or
    FP8 e4m3 with fp8): -> (h [B, L, C] in out_dtype, or None without keep_h; rowquant.QuantRows of h).

    The quantization reads h rounded to out_dtype, as kernels.gemm.quantize_rows reads the stored h, so the
    8-bit rows and scales are bit-identical to layer_norm_mod followed by quantize_rows (the torch twin: by
    rowquant's torch functions), from the whole row the kernel holds anyway (C up to 16384)."""
    dt = out_dtype or x.dtype
    if not use_triton(x, backend):
        h = layer_norm_mod_torch(x, eps, weight, bias, shift, scale, frames, round_in, out_dtype)
        return (h if keep_h else None), QuantRows.of(h, fp8)
    h, (q, s), _ = _ln_mod(x, eps, weight, bias, shift, scale, frames, round_in, out_dtype, keep_h, fp8)
    return h, QuantRows(q, s, tuple(x.shape), dt)


def add_layer_norm_mod(x, y, eps, weight=None, bias=None, shift=None, scale=None, frames=1, out_dtype=None,
                       fp8=None, backend="auto"):
    """s = x + y (y promoted to x's dtype, as the eager sum; x [B, L, C], y of its shape), then layer_norm_mod of
    s (fp8 None) or layer_norm_mod_quant's QuantRows of it (fp8 False: INT8, True: FP8), in one pass -> (s, that).
    The block's residual of the cross-attention and the FFN's norm after it: s is read once, not written by one
    pass and read back by the next."""
    if x.dtype != torch.promote_types(x.dtype, y.dtype) or y.shape != x.shape:
        raise ValueError(f"add_layer_norm_mod adds y {tuple(y.shape)} {y.dtype} into x {tuple(x.shape)} {x.dtype}")
    if not use_triton(x, backend):
        s = x + y
        h = layer_norm_mod_torch(s, eps, weight, bias, shift, scale, frames, False, out_dtype)
        return s, (h if fp8 is None else QuantRows.of(h, fp8))
    h, qs, s = _ln_mod(x, eps, weight, bias, shift, scale, frames, False, out_dtype, fp8 is None, fp8, add=y)
    if fp8 is None:
        return s, h
    return s, QuantRows(*qs, tuple(x.shape), out_dtype or x.dtype)


def ada_layer_norm_torch(x, shift, scale, eps=1e-5):
    """The eager AdaLayerNorm after its linear: x [N, T, C], shift/scale [N, C] in the compute dtype -> fp32."""
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    # (1 + scale) rounds in the compute dtype before the fp32 product, as under autocast
    return h * (1 + scale[:, None]).float() + shift[:, None].float()


def ada_layer_norm(x, shift, scale, eps=1e-5, out_dtype=None, fp8=None, backend="auto"):
    """diffusers' AdaLayerNorm after its linear, as the audio injector runs it: the LayerNorm (no affine) of x
    [N, T, C] in fp32, not rounded, times (1 + scale) rounded to scale's dtype, plus shift (shift/scale [N, C],
    one row per sample-frame) -> rounded to out_dtype (x.dtype by default); with fp8 (False: INT8, True: FP8) the
    rowquant.QuantRows of that instead, for the next W8A8 GEMM. One pass where the eager code makes five."""
    dt = out_dtype or x.dtype
    if not use_triton(x, backend):
        h = ada_layer_norm_torch(x, shift, scale, eps).to(dt)
        return h if fp8 is None else QuantRows.of(h, fp8)
    factor = (1 + scale).float()[:, None]  # rounded as the eager code rounds it; the kernel multiplies by it
    h, qs, _ = _ln_mod(x, eps, None, None, shift.float()[:, None], factor, 1, False, dt, fp8 is None, fp8,
                       round_h=False, one_plus=False)
    return h if fp8 is None else QuantRows(*qs, tuple(x.shape), dt)


def gated_layer_norm_mod(x, y, gate, frames, eps, weight=None, bias=None, round_in=False, out_dtype=None, fp8=None,
                         backend="auto"):
    """s = gated_residual(x, y, gate, frames) (x + y * gate per frame, fp32), then layer_norm_mod of s (the same
    weight, bias, round_in, out_dtype; no modulation) or, with fp8 (False: INT8, True: FP8), layer_norm_mod_quant's
    QuantRows of it, in one pass -> (s, that). The block's self-attention residual and the cross-attention's norm
    after it: s is written once and not read back."""
    if y.shape != x.shape:
        raise ValueError(f"gated_layer_norm_mod adds y {tuple(y.shape)} into x {tuple(x.shape)}")
    if not use_triton(x, backend):
        s = gated_residual_torch(x, y, gate, frames)
        h = layer_norm_mod_torch(s, eps, weight, bias, round_in=round_in, out_dtype=out_dtype)
        return s, (h if fp8 is None else QuantRows.of(h, fp8))
    dt = out_dtype or torch.float32
    h, qs, s = _ln_mod(x, eps, weight, bias, None, None, frames, round_in, dt, fp8 is None, fp8, add=y, gate=gate)
    return s, (h if fp8 is None else QuantRows(*qs, tuple(x.shape), dt))


def gated_residual(x, y, gate, frames, out_dtype=None, backend="auto"):
    """x + y * gate per frame: x [B, L, C] (any float dtype), y [B, L, C], gate [B, F, C] fp32; computed in
    fp32, returned in out_dtype (fp32 by default, as the eager promotion)."""
    if not use_triton(x, backend):
        return gated_residual_torch(x, y, gate, frames, out_dtype)
    b, L, c = x.shape
    out = torch.empty(b, L, c, dtype=out_dtype or torch.float32, device=x.device)
    _gate_rows(_rows(x), _rows(y), gate, L // frames, 0, out.view(b * L, c))
    return out


def gated_residual_rows(x, y, gate, rows_per_frame: int, row0: int, out, backend="auto"):
    """Rows [row0, row0 + M) of gated_residual over a batch flattened to [B*L, C] rows: x, y [M, C] those rows of
    x and y, gate [B, F, C] fp32 (row r's gate row is r // rows_per_frame of gate's [B*F]); written into out
    [M, C] (its dtype, contiguous rows), which is returned. The same bits as those rows of gated_residual: the FFN
    finishes each chunk of rows as soon as its output exists (Block.ffn_gated), with no concatenation."""
    if not use_triton(x, backend):
        g = gate.reshape(-1, gate.shape[-1]).float()
        idx = torch.arange(row0, row0 + x.shape[0], device=g.device) // rows_per_frame
        return out.copy_(x + y.float() * g[idx])
    if out.stride(-1) != 1:
        raise ValueError("gated_residual_rows writes rows with a contiguous last dim")
    _gate_rows(_rows(x), _rows(y), gate, rows_per_frame, row0, out)
    return out


def _gate_rows(x2, y2, gate, rows_per_frame: int, row0: int, out2) -> None:
    c = x2.shape[-1]
    block = min(2048, triton.next_power_of_2(c))
    _gate_kernel[(x2.shape[0], triton.cdiv(c, block))](x2, y2, gate.contiguous().float(), out2, x2.stride(0),
                                                        y2.stride(0), out2.stride(0), c, rows_per_frame, row0,
                                                        BLOCK=block, num_warps=4)


def rope(x, cos, sin, backend="auto", out=None):
    """The interleaved-pair RoPE of x [B, L, H, D] by per-token (cos, sin) [L, D/2] in one pass (kernels.reference.
    rope_apply, its torch twin, for fp32 inputs, which rotate in float64, and off CUDA); x.dtype out. The sink's
    keys, roped per layer for the sdpa path (model.attention). out: where to write it (x's shape and dtype; the
    kernel writes a contiguous one directly, e.g. the sink room behind a step cache's window), returned."""
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"rope out= must be {tuple(x.shape)} {x.dtype}, not {tuple(out.shape)} {out.dtype}")
    if x.dtype == torch.float32 or x.shape[1] == 0 or not use_triton(x, backend) or (
            out is not None and not out.is_contiguous()):
        y = rope_apply(x, cos.to(x.device), sin.to(x.device))
        return y if out is None else out.copy_(y)
    b, L, h, d = x.shape
    x2 = x.reshape(b * L, h * d) if x.is_contiguous() else x.contiguous().view(b * L, h * d)
    out = torch.empty(b, L, h, d, dtype=x.dtype, device=x.device) if out is None else out
    block = min(1024, triton.next_power_of_2(h * d // 2))
    _rope_kernel[(b * L, triton.cdiv(h * d // 2, block))](x2, cos.contiguous(), sin.contiguous(), out, x2.stride(0),
                                                           h * d, h * d, L, HALF=d // 2, BLOCK=block, num_warps=4)
    return out
