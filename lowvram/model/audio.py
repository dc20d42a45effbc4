"""S2V audio path: the causal audio encoder (learned layer weighting + causal Conv1d stack) and the
audio injectors (AdaLN + per-frame cross-attention), docs/model.md §6.2."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowvram.kernels import fused
from lowvram.model.layers import CrossAttention, linear_fp32
from lowvram.quantize import fuse


class CausalConv1d(nn.Module):
    """Conv1d with replicate padding of k-1 steps on the left (causal)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(cin, cout, kernel_size, stride=stride)

    def forward(self, x):  # x: [B, C, T] fp32
        x = F.pad(x, (self.pad, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), self.conv.stride)


class MotionEncoder(nn.Module):
    """MotionEncoder_tc: local path gives num_token tokens (+ the learned padding token) per step,
    global path one token per step; both downsample time by 4 (two stride-2 convs)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_token: int):
        super().__init__()
        self.num_token = num_token
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_token, 3)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    @staticmethod
    def _ln_silu(x):  # x: [N, C, T] -> LN over C (eps 1e-6, no affine), SiLU, back to [N, C, T]
        x = x.transpose(1, 2)
        return F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6)).transpose(1, 2)

    def _tail(self, x):  # conv2 -> conv3 with LN + SiLU after each: [N, C/4, T] -> [N, T/4, C]
        x = self._ln_silu(self.conv2(x))
        return self._ln_silu(self.conv3(x)).transpose(1, 2)

    def forward(self, x):  # x: [B, T, Cin] fp32 -> (global [B, T', 1, C], local [B, T', n+1, C])
        b = x.shape[0]
        xc = x.transpose(1, 2)                                   # [B, Cin, T]
        loc = self.conv1_local(xc)                               # [B, n*C/4, T]
        loc = loc.unflatten(1, (self.num_token, -1)).flatten(0, 1)  # [B*n, C/4, T]
        loc = self._tail(self._ln_silu(loc))                     # [B*n, T', C]
        loc = loc.unflatten(0, (b, self.num_token)).transpose(1, 2)  # [B, T', n, C]
        pad = self.padding_tokens.float().expand(b, loc.shape[1], 1, -1)
        loc = torch.cat([loc, pad], dim=2)
        glo = self._tail(self._ln_silu(self.conv1_global(xc)))   # [B, T', C]
        glo = linear_fp32(self.final_linear, glo)
        return glo.unsqueeze(2), loc


class CausalAudioEncoder(nn.Module):
    """`casual_audio_encoder` (sic, the checkpoint's name): SiLU-weighted mean of the wav2vec2
    hidden states, then the motion encoder, all in fp32."""

    def __init__(self, audio_dim: int, dim: int, num_layers: int = 25, num_token: int = 4):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = MotionEncoder(audio_dim, dim, num_token)

    def forward(self, features):  # features: [B, L, Da, T] -> (global [B,T',1,C], local [B,T',n+1,C])
        w = F.silu(self.weights.float())
        feat = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, Da, T]
        return self.encoder(feat.transpose(1, 2))


class AdaLayerNorm(nn.Module):
    """diffusers AdaLayerNorm(chunk_dim=1): (shift, scale) = Linear(SiLU(temb)); LN eps 1e-5."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb, rows: int | None = None, out_dtype=None, fp8: bool | None = None):
        """x: [N, L, C]; temb: [N, C] -> fp32 [N, L, C], as the reference; with out_dtype, rounded to it, and with
        fp8 (False: INT8, True: FP8) the rowquant.QuantRows of that for a W8A8 layer (one pass on the GPU,
        fused.ada_layer_norm; the eager arithmetic on the CPU)."""
        # rows: temb's rows per sample of a batch; their GEMMs then run per sample, as a GEMM of a few rows does not
        # give the bits of the same rows inside a larger one (MKL's fp32 GEMM of 1-11 rows, but 4 and 8, on an AMD
        # EPYC; cuBLAS picks kernels by M), and a batched forward keeps each sample's unbatched bits
        t = F.silu(temb)
        y = self.linear(t) if rows is None or rows >= t.shape[0] else torch.cat([self.linear(c) for c in t.split(rows)])
        shift, scale = y.chunk(2, dim=1)
        if out_dtype is None:
            return fused.ada_layer_norm_torch(x, shift, scale)
        return fused.ada_layer_norm(x, shift, scale, out_dtype=out_dtype, fp8=fp8)


class AudioInjector(nn.Module):
    """`audio_injector`: after the blocks in audio_inject_layers, each latent frame's tokens
    cross-attend to that frame's audio tokens; the result is added ungated."""

    def __init__(self, dim: int, num_heads: int, inject_layers, eps: float = 1e-6):
        super().__init__()
        self.block_to_injector = {blk: i for i, blk in enumerate(inject_layers)}
        self.injector = nn.ModuleList([CrossAttention(dim, num_heads, eps) for _ in inject_layers])
        self.injector_adain_layers = nn.ModuleList([AdaLayerNorm(dim) for _ in inject_layers])

    def forward(self, block_idx: int, x, audio_local, audio_global):
        """x: [B, F*T, C] noisy tokens (compute dtype); audio_local: [B, F, n+1, C];
        audio_global: [B, F, 1, C] (both in the compute dtype). Returns x + injection."""
        k = self.block_to_injector.get(block_idx)
        if k is None:
            return x
        b, f = audio_local.shape[:2]
        inj = self.injector[k]
        h = x.unflatten(1, (f, -1)).flatten(0, 1)                       # [B*F, T, C]
        # the norm writes q's 8-bit input where q is a W8A8 layer (the block's norms do the same, quantize/fuse.py)
        scheme = fuse.input_scheme(h, (inj.q,)) if inj.fuse else None
        h = self.injector_adain_layers[k](h, audio_global.flatten(0, 1)[:, 0], rows=f, out_dtype=x.dtype,
                                          fp8=None if scheme is None else scheme == "fp8")
        out = inj(h, audio_local.flatten(0, 1))                         # [B*F, T, C]
        return x + out.unflatten(0, (b, f)).flatten(1, 2)
