"""8-bit two-segment attention reading the 8-bit KV cache in place, and that cache's format.

Cache format (`KV8Cache`, one per layer and step cache): INT8 K and INT8 V with an fp32 scale per
(token, head) by kernels/rowquant.py's rule (absmax/127, ties to even). K is smoothed first
(SageAttention): a mean over tokens per (batch, head), taken from the cache's first write and reused
for every later write, is subtracted before quantizing, which removes the channel offsets (outlier
channels) that would otherwise set the per-token scale. Since the mean is one vector for the whole
window, q.mean is a per-query constant of the window's scores; the kernel adds it back because the
softmax also spans the sink, whose scores do not carry it.
V is INT8 on every device: the INT8 MMA is as fast as FP8 on sm_89/sm_90 and the only 8-bit MMA
on sm_80/86, and INT8 with per-token scales quantizes V more finely than e4m3.

Kernel: one program per (BLOCK_M queries, batch x head); Q is quantized per query row inside the
kernel (softmax scale and log2(e) folded in first; rowquant.quantize_tile, the same rule). Window
tiles: S = (q8 k8^T) qs ks + q.mean; online softmax in base 2; the probabilities of a tile, taken
relative to the tile's own row max (so every row uses the full INT8 range) and weighted by each
token's V scale relative to the tile's largest, are quantized to INT8 and multiplied with the INT8 V;
the per-row factor exp2(m_tile - m_run) * max(v_scale) / 127 rescales the int32 result. Sink tiles
are bf16 (keys un-roped, roped in registers exactly as in attention.py): the sink is small (2640 of
15312 keys) and stays in bf16 in the model.
Limits: as attention.py; window from a KV8Cache (views along L allowed), sink in bf16/fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowvram.kernels import configs
from lowvram.kernels.attention import LOG2E, autotuned, bench_multipliers, launch_opts, sink_multipliers, triton_usable
from lowvram.kernels.kvquant import quantize_tokens_int8
from lowvram.kernels.reference import attention_torch

try:
    import triton
    import triton.language as tl

    from lowvram.kernels.attention import _sink_segment, _tile_start, _tile_store
    from lowvram.kernels.rowquant import quantize_tile
except ImportError:  # CPU-only installs: the torch fallback serves
    triton = None


@dataclass
class KV8Cache:
    """8-bit KV cache of one layer: k int8 [B, L, H, D], v int8 [B, H, D, L] (token-contiguous, the
    K-major operand layout that 8-bit wgmma needs for P @ V), k_scale, v_scale fp32 [B, H, L]
    (token-contiguous: a key tile's scales are one vector load),
    k_mean fp32 [B, H, D]."""

    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    k_mean: torch.Tensor
    mean_ready: bool = False

    @property
    def length(self) -> int:
        return self.k.shape[1]


def kv8_alloc(B: int, L: int, H: int, D: int, device="cpu") -> KV8Cache:
    """An empty cache of L tokens (about 2*L*H*(D+4) bytes per batch entry)."""
    k = torch.zeros(B, L, H, D, dtype=torch.int8, device=device)
    v = torch.zeros(B, H, D, L, dtype=torch.int8, device=device)
    zs = lambda: torch.ones(B, H, L, dtype=torch.float32, device=device)  # noqa: E731
    return KV8Cache(k, zs(), v, zs(), torch.zeros(B, H, D, dtype=torch.float32, device=device))


def kv8_write(cache: KV8Cache, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize k (roped), v [B, n, H, D] into cache tokens [start, start + n) in place.

    The first write fixes the smoothing mean of K (mean over its tokens) for the cache's life.
    """
    n = k.shape[1]
    if start < 0 or start + n > cache.length:
        raise ValueError(f"kv8_write of {n} tokens at {start} overruns the cache of {cache.length}")
    if not cache.mean_ready:
        cache.k_mean.copy_(k.float().mean(dim=1))  # [B, H, D]
        cache.mean_ready = True
    # per (token, head), straight into the cache's layouts ([B, n, H, D] and [B, n, H] views of them): one pass each
    # on the GPU (kernels/kvquant.py), rowquant's torch functions elsewhere; the same bits
    win = slice(start, start + n)
    quantize_tokens_int8(k, cache.k[:, win], cache.k_scale[..., win].transpose(1, 2), mean=cache.k_mean)
    quantize_tokens_int8(v, cache.v[..., win].permute(0, 3, 1, 2), cache.v_scale[..., win].transpose(1, 2))


def kv8_window(cache: KV8Cache, end: int) -> KV8Cache:
    """A view of the cache's first `end` tokens (no copy)."""
    return replace(cache, k=cache.k[:, :end], k_scale=cache.k_scale[..., :end],
                   v=cache.v[..., :end], v_scale=cache.v_scale[..., :end])


def kv8_dequantize(cache: KV8Cache, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's keys and values back in `dtype`: ([B, L, H, D], [B, L, H, D])."""
    k = cache.k.float() * cache.k_scale.transpose(1, 2)[..., None] + cache.k_mean[:, None]
    v = cache.v.permute(0, 3, 1, 2).float() * cache.v_scale.transpose(1, 2)[..., None]
    return k.to(dtype), v.to(dtype)


if triton is not None:

    @triton.jit
    def _int8_step(kp, vp, ksp, vsp, n, Lw, q8, qs, qm, m_i, l_i, acc, MASK: tl.constexpr):
        # one window tile: INT8 QK^T, online softmax, INT8 PV (see the module docstring)
        if MASK:
            valid = n < Lw
            k8 = tl.load(kp, mask=valid[:, None], other=0)
            v8 = tl.load(vp, mask=valid[None, :], other=0)
            ks = tl.load(ksp, mask=valid, other=0.0)
            vs = tl.load(vsp, mask=valid, other=0.0)
        else:
            k8 = tl.load(kp)
            v8 = tl.load(vp)
            ks = tl.load(ksp)
            vs = tl.load(vsp)
        s = tl.dot(q8, tl.trans(k8)).to(tl.float32) * ks[None, :] * qs[:, None] + qm[:, None]
        if MASK:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_tile = tl.max(s, 1)
        m_new = tl.maximum(m_i, m_tile)
        p = tl.math.exp2(s - m_tile[:, None])  # [BM, BN] in [0, 1], row max 1
        p_max = tl.math.exp2(m_tile - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + p_max * tl.sum(p, 1)
        v_max = tl.max(vs, 0)
        p8 = (p * (vs * (127.0 / v_max))[None, :] + 0.5).to(tl.int32).to(tl.int8)
        pv = tl.dot(p8, tl.trans(v8)).to(tl.float32)  # v8: [D, BN]
        acc = acc * alpha[:, None] + pv * (p_max * (v_max / 127.0))[:, None]
        return m_new, l_i, acc

    @triton.jit
    def _attn8_fwd(Q, KW, KWS, KM, VW, VWS, KS, VS, COS, SIN, O,
                   sqb, sql, sqh, skb, skl, skh, sksb, sksh, svb, svh, svd, svl, svsb, svsh, smb, smh,
                   s2kb, s2kl, s2kh, s2vb, s2vl, s2vh, sob, sol, soh,
                   H, Lq, Lw, Ls, qk_scale, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        b, h, offs_m, offs_n, offs_d, q, m_i, l_i, acc = _tile_start(Q, None, sqb, sql, sqh, H, Lq, BLOCK_M, BLOCK_N,
                                                                     D, False)

        if Lw > 0:
            # Q to INT8 per row, softmax scale folded in; q.mean restores the smoothed-away term
            qf = q.to(tl.float32) * qk_scale
            q8, qs = quantize_tile(qf, 127.0, False, tl.int8)  # [BM, D] int8, [BM]
            mean = tl.load(KM + b * smb + h * smh + offs_d)  # [D] fp32
            qm = tl.sum(qf * mean[None, :], 1)  # [BM]
            kw = KW + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :]
            vw = VW + b * svb + h * svh + offs_d[:, None] * svd + offs_n[None, :]  # [D, BN], svl = 1
            ksp = KWS + b * sksb + h * sksh + offs_n  # scales [B, H, L]: token-contiguous
            vsp = VWS + b * svsb + h * svsh + offs_n
            w_full = (Lw // BLOCK_N) * BLOCK_N
            for start in range(0, w_full, BLOCK_N):
                m_i, l_i, acc = _int8_step(kw + start * skl, vw + start * svl, ksp + start,
                                           vsp + start, start + offs_n, Lw, q8, qs, qm,
                                           m_i, l_i, acc, False)
            if w_full < Lw:
                m_i, l_i, acc = _int8_step(kw + w_full * skl, vw + w_full * svl, ksp + w_full,
                                           vsp + w_full, w_full + offs_n, Lw, q8, qs, qm,
                                           m_i, l_i, acc, True)

        m_i, l_i, acc = _sink_segment(q, m_i, l_i, acc, KS + b * s2kb + h * s2kh, VS + b * s2vb + h * s2vh,
                                      s2kl, s2vl, offs_n, offs_d, Ls, COS, SIN, qk_scale, D, BLOCK_N, UPCAST)
        _tile_store(O, acc, l_i, b, h, sob, sol, soh, offs_m, offs_d, Lq)

_TUNED: dict = {}


def _kernel(family: str):
    return autotuned(_TUNED, _attn8_fwd, configs.ATTENTION8, family)


def two_segment_attention8(q, win: KV8Cache, k_sink, v_sink, sink_cos, sink_sin, scale=None,
                           backend: str = "auto", block: tuple | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Like attention.two_segment_attention, with the window read from an 8-bit cache view.

    q [B, Lq, H, D] bf16; win: kv8_window(cache, end) ([B, Lw, H, D], keys roped before
    quantizing); k_sink (un-roped), v_sink [B, Ls, H, D] bf16; sink_cos, sink_sin [Ls, D/2]: as
    two_segment_attention. Returns q.dtype.
    backend "torch" dequantizes the window and runs the torch fallback; block, out: as two_segment_attention.
    """
    B, Lq, H, D = q.shape
    Lw, Ls = win.k.shape[1], k_sink.shape[1]
    if Lw + Ls == 0:
        raise ValueError("two_segment_attention8 needs at least one key")
    use_triton = backend == "triton" or (backend == "auto" and triton_usable(q))
    if not use_triton:
        kw, vw = kv8_dequantize(win, q.dtype)
        res = attention_torch(q, kw, vw, k_sink, v_sink, sink_cos, sink_sin, scale)
        return res if out is None else out.copy_(res)
    if triton is None:
        raise RuntimeError("backend='triton' needs triton installed")
    q, k_sink, v_sink = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_sink, v_sink))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cos, sin = sink_multipliers(sink_cos, sink_sin, Ls, D, q.device)
    if out is None:
        out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    for t in (win.k, win.v, win.k_scale, win.v_scale, win.k_mean):
        if t.stride(-1) != 1:
            raise ValueError("KV8Cache tensors must have a contiguous last dim")
    args = (q, win.k, win.k_scale, win.k_mean, win.v, win.v_scale, k_sink, v_sink, cos, sin, out,
            q.stride(0), q.stride(1), q.stride(2), win.k.stride(0), win.k.stride(1), win.k.stride(2),
            win.k_scale.stride(0), win.k_scale.stride(1), win.v.stride(0), win.v.stride(1), win.v.stride(2), 1,
            win.v_scale.stride(0), win.v_scale.stride(1), win.k_mean.stride(0), win.k_mean.stride(1),
            k_sink.stride(0), k_sink.stride(1), k_sink.stride(2), v_sink.stride(0), v_sink.stride(1),
            v_sink.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, Lq, Lw, Ls, scale * LOG2E)
    up = configs.interpreting()
    if block is not None:
        grid = (triton.cdiv(Lq, block[0]), B * H)
        _attn8_fwd[grid](*args, D=D, BLOCK_M=block[0], BLOCK_N=block[1], UPCAST=up, **launch_opts(block))
    else:
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _kernel(configs.arch_family(q.device))[grid](*args, D=D, UPCAST=up)
    return out


def bench_attention8(B=1, Lq=3168, Lw=12672, Ls=2640, H=40, D=128, device="cuda") -> dict:
    """Median time (ms) and TFLOP/s of the 8-bit kernel at one shape, random inputs."""
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(B, Lq, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    cache = kv8_alloc(B, Lw, H, D, device)
    kv8_write(cache, 0, *(torch.randn(B, Lw, H, D, device=device, dtype=torch.bfloat16, generator=gen)
                          for _ in range(2)))
    ks, vs = (torch.randn(B, Ls, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    cos, sin = bench_multipliers(Ls, D, device, gen)
    fn = lambda: two_segment_attention8(q, cache, ks, vs, cos, sin)  # noqa: E731
    ms = triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
    return {"ms": ms, "tflops": 4.0 * B * H * Lq * (Lw + Ls) * D / ms / 1e9}
