"""Building blocks of the S2V DiT with the checkpoint's attribute names (docs/model.md §2.2, §4).

Numerics follow LiveAvatar under bf16 autocast without using autocast: Linear layers run in
the weights' dtype (bf16 on GPU, fp32 in CPU tests), norms compute in fp32 and round where the
reference rounds, modulation and gated residuals are fp32.
W8A8 layers (QuantLinear) of one scheme that read the same activation share one 8-bit copy of it, written
by the norm before them where there is one (lowvram.quantize.fuse); the FFN's GELU runs in ffn.2's quantization.
`fuse = False` on a module (set_fuse) keeps each layer quantizing its own input and the GELU separate.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowvram.kernels import fused
from lowvram.kernels.rowquant import QuantRows
from lowvram.quantize import fuse

# latent frames of tokens per FFN chunk (per sample): the [B * rows, ffn_dim] hidden of one chunk (and a W8A8
# layer's int32/fp32 temporaries) is the forward's largest activation; rows are independent, so any size is exact
# and larger chunks run larger GEMMs (tools/bench_block.py measures it). The planner's activation fit assumes 1.
FFN_CHUNK_FRAMES = 1
# ... but at least this many rows per chunk (of all samples): at B = 1 the FFN's GEMMs then run at M = 3168 instead
# of 3 x 1056 (H200, INT8: 1.03 vs 1.20 ms a block's FFN, bench_block "chunk 3" vs "chunk 1"); a hidden of 3168
# rows is 0.15 GB more than one frame's at 704x384, and B >= 3 already chunks B x 1056 rows
FFN_MIN_ROWS = 3168


class RMSNorm(nn.Module):
    """WanRMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, cast back, times weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, rope=None, heads=1):  # x: [B, L, C]; rope: (cos, sin) [L, D/2] to rope each head after
        return fused.rms_norm_rope(x, self.weight, self.eps, *(rope or (None, None)), heads=heads)


class LayerNorm(nn.LayerNorm):
    """WanLayerNorm: LayerNorm computed in fp32, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear computed in fp32 (the reference's fp32 autocast regions)."""
    b = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), layer.weight.float(), b)


class SelfAttention(nn.Module):
    """q, k, v, o projections with RMS q/k norms over the full width; the attention itself is a callable."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.fuse = True  # q, k, v read one 8-bit copy of x where they can (module docstring)

    def forward(self, x, attend: Callable, rope=None):
        """x: [B, L, C] (or its rowquant.QuantRows, written by the norm before); rope: (cos, sin) of x's tokens,
        [L, D/2] or per sample [B*L, D/2], applied to q and k with their norms (one fused pass on the GPU);
        without it attend gets un-roped q and k. attend returns [B, L, H, D], or a list of the B samples' [1, L, H,
        D] (each over its own window), which a W8A8 o quantizes into one input without concatenating them."""
        b, s = x.shape[:2]
        n = self.num_heads
        x = fuse.shared(x, (self.q, self.k, self.v)) if self.fuse else x
        q = self._norm_rope(self.norm_q, self.q(x), rope).view(b, s, n, self.head_dim)
        k = self._norm_rope(self.norm_k, self.k(x), rope).view(b, s, n, self.head_dim)
        v = self.v(x).view(b, s, n, self.head_dim)
        out = attend(q, k, v)
        if isinstance(out, list):  # a batch's outputs, one per sample [1, s, n, D]: o reads them unconcatenated
            parts = [o.reshape(s, -1) for o in out]
            rows = fuse.quantize_parts(parts, (self.o,), (b, s, parts[0].shape[-1])) if self.fuse else None
            if rows is not None:
                return self.o(rows)
            out = torch.cat(out)
        return self.o(out.flatten(2))

    def _norm_rope(self, norm, y, rope):  # y: [B, L, C]
        b, s, c = y.shape
        if rope is None or b == 1 or rope[0].shape[0] == s:  # positions shared by the batch
            return norm(y, rope, self.num_heads)
        return norm(y.reshape(1, b * s, c), rope, self.num_heads).view(b, s, c)  # rows roped at their own positions


class CrossAttention(SelfAttention):
    """Text (and audio) cross-attention: queries from x, keys/values from a context, no RoPE."""

    def forward(self, x, context):  # x: [B, L1, C] or its QuantRows; context: [B, L2, C] or [1, L2, C] (shared)
        b, bc = x.shape[0], context.shape[0]
        n, d = self.num_heads, self.head_dim
        context = fuse.shared(context, (self.k, self.v)) if self.fuse else context
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(bc, -1, n, d).expand(b, -1, -1, -1)  # the context's K/V once
        v = self.v(context).view(bc, -1, n, d).expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """One CausalWanS2VAttentionBlock: adaLN self-attention, affine-LN text cross-attention, FFN."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.fuse = True  # the norms write their W8A8 consumers' 8-bit input; the FFN's GELU in ffn.2's quantization

    def forward(self, x, e0, context, attend: Callable, frames: int, rope=None):
        """x: [B, L, C] in the compute dtype; e0: [B, frames, 6, C] fp32 time projection of each
        frame's t (L = frames * tokens per frame); context: [B, 512, C]; rope: see SelfAttention.
        The norm + modulation and gate + residual chains are one pass each, a residual and the norm after it
        one pass together (kernels/fused.py on the GPU, the same eager arithmetic on the CPU)."""
        dt = x.dtype
        m = self.modulation.float().unsqueeze(1) + e0                   # [B, F, 6, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)    # each [B, F, C]
        eps = self.norm1.eps

        q, k, v = self.self_attn.q, self.self_attn.k, self.self_attn.v
        h = self._norm((q, k, v), x, eps, shift=shift1, scale=scale1, frames=frames, out_dtype=dt)
        y = self.self_attn(h, attend, rope)
        # x + y * gate1 (fp32 from here) and the cross-attention's norm of it in one pass; the reference rounds the
        # cross-attention's input to bf16 whatever the compute dtype
        x, h = self._norm((self.cross_attn.q,), x, self.norm3.eps, self.norm3.weight, self.norm3.bias, round_in=True,
                          out_dtype=dt, gated=(y, gate1, frames))
        # x + the cross-attention, and the FFN's norm of that sum, in one pass
        x, h = self._norm((self.ffn[0],), x, self.norm2.eps, shift=shift2, scale=scale2, frames=frames, out_dtype=dt,
                          add=self.cross_attn(h, context))
        return self.ffn_gated(x, h, gate2, frames, dt)

    def _ffn_parts(self, h, frames: int) -> tuple[int, list]:
        """h [B, L, C] (or its QuantRows) as the FFN's chunks of rows of the flattened [B*L, C]: B x FFN_CHUNK_FRAMES
        latent frames' rows each (FFN_CHUNK_FRAMES says why), contiguous (a strided [B, rows, C] slice computes
        otherwise) -> (rows per chunk, the chunks)."""
        b, L, c = h.shape
        n = b * min(L, max(max(1, L // frames) * FFN_CHUNK_FRAMES, -(-FFN_MIN_ROWS // b)))
        if isinstance(h, QuantRows):  # already [B*L, C] 8-bit rows
            return n, h.split(n)
        return n, list(h.reshape(b * L, c).split(n))

    def ffn_chunks(self, h, frames: int):
        """The FFN of h [B, L, C] (or its QuantRows) over its chunks (_ffn_parts) -> [B, L, C]."""
        b, L, _ = h.shape
        return torch.cat([self._ffn(part) for part in self._ffn_parts(h, frames)[1]]).view(b, L, -1)

    def ffn_gated(self, x, h, gate, frames: int, out_dtype):
        """x + FFN(h) * gate per frame (fused.gated_residual's bits) -> [B, L, C] in out_dtype: x [B, L, C], h its
        norm (or QuantRows), gate [B, F, C] fp32. Each chunk's rows are finished as soon as its FFN output exists,
        so the chunks' outputs are never concatenated (a [B*L, C] copy per layer)."""
        b, L, c = x.shape
        out = torch.empty(b, L, c, dtype=out_dtype, device=x.device)
        x2, out2 = x.reshape(b * L, c), out.view(b * L, c)
        n, parts = self._ffn_parts(h, frames)
        for i, part in enumerate(parts):
            y = self._ffn(part).reshape(-1, c)
            a, e = i * n, i * n + y.shape[0]
            fused.gated_residual_rows(x2[a:e], y, gate, L // frames, a, out2[a:e])
        return out

    def _norm(self, layers, x, eps, *affine, add=None, gated=None, **kw):
        """fused.layer_norm_mod of x [B, L, C] for `layers`, which all read it: written as their shared 8-bit
        input (QuantRows of [B, L, C]) where they can take one, else h [B, L, C]. add: of x + add instead
        (fused.add_layer_norm_mod) -> (x + add, that); gated (y, gate, frames): of x + y * gate in fp32
        (fused.gated_layer_norm_mod) -> (that sum, that)."""
        scheme = fuse.input_scheme(x, layers) if self.fuse else None
        if gated is not None:
            return fused.gated_layer_norm_mod(x, *gated, eps, *affine, fp8=None if scheme is None else scheme == "fp8",
                                              **kw)
        if add is not None:
            return fused.add_layer_norm_mod(x, add, eps, *affine, fp8=None if scheme is None else scheme == "fp8", **kw)
        if scheme is None:
            return fused.layer_norm_mod(x, eps, *affine, **kw)
        return fused.layer_norm_mod_quant(x, eps, *affine, fp8=scheme == "fp8", **kw)[1]

    def _ffn(self, h):  # h: [..., C] or its QuantRows -> [..., C]
        return fuse.ffn(self.ffn, h) if self.fuse else self.ffn(h)


def set_fuse(model: nn.Module, on: bool) -> int:
    """Turn the shared 8-bit inputs and the FFN's fused GELU on or off in every module of `model` that has them
    (`fuse`, the unfused path when off); returns how many were set."""
    count = 0
    for m in model.modules():
        if isinstance(m, (SelfAttention, Block)):
            m.fuse = on
            count += 1
    return count


class Head(nn.Module):
    """Head_S2V: LN (no affine), per-frame (shift, scale) from modulation + e, Linear, in fp32."""

    def __init__(self, dim: int, out_dim: int, patch_size, eps: float = 1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_dim * patch_size[0] * patch_size[1] * patch_size[2])
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e, frames: int):  # x: [B, L, C]; e: [B, F, C] fp32
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unbind(2)  # [B, F, C]
        h = self.norm(x).unflatten(1, (frames, -1)).float() * (1 + scale[:, :, None]) + shift[:, :, None]
        return linear_fp32(self.head, h.flatten(1, 2)).to(x.dtype)


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """cat[cos, sin] of position * 10000^(-i/half), in float64 (cos first)."""
    half = dim // 2
    position = position.to(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half, dtype=torch.float64,
                                                                     device=position.device).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)
