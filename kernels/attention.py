"""bf16 flash attention over two key segments, with the sink keys roped inside the kernel.

Algorithm: one program per (BLOCK_M queries, batch x head); online softmax in base 2 with fp32
statistics and accumulator (FlashAttention-2 forward). The keys come from two segments read in
place, never concatenated: the KV window (keys already roped) and the sink (keys stored
un-roped). Each sink key tile is roped in registers: token n's pairs take the rows sink_cos[n],
sink_sin[n] [D/2] (the model's fp16 multipliers at the sink positions, sin negated for a negative
time position; the model gathers them once per forward), rotate in fp32 and round to bf16, which is
bit-identical to reference.rope_apply (products of a bf16 and an fp16 value are exact in fp32).
Non-causal, no mask; softmax over the union of both segments. On Hopper (configs.ATTENTION_TMA) q and
the full key/value tiles are loaded through TMA tensor descriptors over the [B, L, H, D] tensors (rows
past a segment's end read as zeros and are masked like the pointer path's); P·V accumulates in the MMA.

Limits: D a power of two >= 16 (pairs need D/2 >= 8); bf16 or fp16 in, same dtype out; the last
dim of every input contiguous (views along L of a bigger cache are fine, strides are passed);
sink_cos/sink_sin [Ls, D/2] (any float dtype; fp16 table values for the bit-identity above).
"""

from __future__ import annotations

import math

import torch

from lowvram.kernels import configs
from lowvram.kernels.reference import attention_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (macOS, Windows): the torch fallback serves
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: pointer loads only
    TensorDescriptor = None

LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def mma(a, b, UPCAST: tl.constexpr, acc=None):
        # acc + a @ b with fp32 accumulation (in the MMA itself when acc is given). The CPU
        # interpreter (Triton <= 3.9) mis-multiplies bf16 operands, so there it multiplies their
        # exact fp32 copies instead: the same sum.
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def _softmax_step(qk, scale, v, m_i, l_i, acc, UPCAST: tl.constexpr):
        # qk: [BM, BN] fp32 raw scores (scale = softmax scale * log2 e), v: [BN, D] -> (m_i, l_i, acc)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
        p = tl.math.exp2(qk * scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, UPCAST, acc * alpha[:, None])
        return m_new, l_i, acc

    @triton.jit
    def _rope_tile(k, n, Ls, COS, SIN, D: tl.constexpr, BLOCK_N: tl.constexpr):
        # k: [BN, D] un-roped sink keys of tokens n [BN] -> roped, same dtype; COS/SIN: per-token rows
        # [Ls, HALF], sign folded (sink_cos, sink_sin)
        HALF: tl.constexpr = D // 2
        j = tl.arange(0, HALF)
        c = tl.load(COS + n[:, None] * HALF + j[None, :], mask=n[:, None] < Ls, other=0.0).to(tl.float32)
        sn = tl.load(SIN + n[:, None] * HALF + j[None, :], mask=n[:, None] < Ls, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(k.to(tl.float32), (BLOCK_N, HALF, 2)))
        kr = tl.join(a * c - b * sn, a * sn + b * c)  # [BN, HALF, 2]
        return tl.reshape(kr, (BLOCK_N, D)).to(k.dtype)

    @triton.jit
    def _sink_segment(q, m_i, l_i, acc, KS, VS, sksl, svsl, offs_n, offs_d, Ls, COS, SIN, qk_scale,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DKS=None, DVS=None, b=0, h=0,
                      TMA: tl.constexpr = False):
        """Online softmax over the sink of one (batch, head): un-roped keys roped tile by tile.
        KS, VS point at the (b, h) slice (or, with TMA, DKS/DVS describe the whole [B, Ls, H, D]
        tensors: rows past Ls read as zeros); shared by the bf16 and the 8-bit kernels."""
        ks = KS + offs_n[:, None] * sksl + offs_d[None, :]
        vs = VS + offs_n[:, None] * svsl + offs_d[None, :]
        for start in range(0, Ls, BLOCK_N):
            n = start + offs_n
            if TMA:
                k = DKS.load([b, start, h, 0]).reshape(BLOCK_N, D)
                v = DVS.load([b, start, h, 0]).reshape(BLOCK_N, D)
            else:
                k = tl.load(ks + start * sksl, mask=n[:, None] < Ls, other=0.0)
                v = tl.load(vs + start * svsl, mask=n[:, None] < Ls, other=0.0)
            k = _rope_tile(k, n, Ls, COS, SIN, D, BLOCK_N)
            s = mma(q, tl.trans(k), UPCAST)
            s = tl.where(n[None, :] < Ls, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, qk_scale, v, m_i, l_i, acc, UPCAST)
        return m_i, l_i, acc

    @triton.jit
    def _tile_start(Q, DQ, sqb, sql, sqh, H, Lq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                    TMA: tl.constexpr):
        """A program's (batch, head), its offsets, its q tile [BM, D] (through the descriptor DQ with TMA,
        rows past Lq read as zeros) and a fresh online-softmax state; shared by both kernels."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if TMA:
            q = DQ.load([b, pid_m * BLOCK_M, h, 0]).reshape(BLOCK_M, D)
        else:
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :],
                        mask=offs_m[:, None] < Lq, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        return b, h, offs_m, offs_n, offs_d, q, m_i, l_i, acc

    @triton.jit
    def _tile_store(O, acc, l_i, b, h, sob, sol, soh, offs_m, offs_d, Lq):
        """The normalised output rows of one program (rows past Lq are not written)."""
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < Lq)

    @triton.jit
    def _attn_fwd(Q, KW, VW, KS, VS, COS, SIN, O, DQ, DKW, DVW, DKS, DVS,
                  sqb, sql, sqh, skwb, skwl, skwh, svwb, svwl, svwh,
                  sksb, sksl, sksh, svsb, svsl, svsh, sob, sol, soh,
                  H, Lq, Lw, Ls, qk_scale, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
        # TMA: q and the full key/value tiles come through tensor descriptors (DQ, DKW, DVW, DKS,
        # DVS over the [B, L, H, D] tensors, set up by the wrapper) instead of pointer loads
        b, h, offs_m, offs_n, offs_d, q, m_i, l_i, acc = _tile_start(Q, DQ, sqb, sql, sqh, H, Lq, BLOCK_M, BLOCK_N,
                                                                     D, TMA)

        # segment 1: the window, keys already roped; full tiles unmasked, then the tail
        kw = KW + b * skwb + h * skwh + offs_n[:, None] * skwl + offs_d[None, :]
        vw = VW + b * svwb + h * svwh + offs_n[:, None] * svwl + offs_d[None, :]
        w_full = (Lw // BLOCK_N) * BLOCK_N
        for start in range(0, w_full, BLOCK_N):
            if TMA:
                k = DKW.load([b, start, h, 0]).reshape(BLOCK_N, D)
                v = DVW.load([b, start, h, 0]).reshape(BLOCK_N, D)
            else:
                k = tl.load(kw + start * skwl)
                v = tl.load(vw + start * svwl)
            s = mma(q, tl.trans(k), UPCAST)
            m_i, l_i, acc = _softmax_step(s, qk_scale, v, m_i, l_i, acc, UPCAST)
        if w_full < Lw:
            n = w_full + offs_n
            k = tl.load(kw + w_full * skwl, mask=n[:, None] < Lw, other=0.0)
            v = tl.load(vw + w_full * svwl, mask=n[:, None] < Lw, other=0.0)
            s = mma(q, tl.trans(k), UPCAST)
            s = tl.where(n[None, :] < Lw, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, qk_scale, v, m_i, l_i, acc, UPCAST)

        # segment 2: the sink, keys roped here by their multipliers
        m_i, l_i, acc = _sink_segment(q, m_i, l_i, acc, KS + b * sksb + h * sksh, VS + b * svsb + h * svsh,
                                      sksl, svsl, offs_n, offs_d, Ls, COS, SIN, qk_scale,
                                      D, BLOCK_N, UPCAST, DKS, DVS, b, h, TMA)
        _tile_store(O, acc, l_i, b, h, sob, sol, soh, offs_m, offs_d, Lq)

_TUNED: dict = {}


def autotuned(cache: dict, kernel, space, family: str, key=("D",), pre_hook=None):
    """`kernel` autotuned over the configs of `space` (kernels/configs.py) for a device family, made once."""
    if family not in cache:
        cfgs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                              num_warps=c["num_warps"], num_stages=c["num_stages"], pre_hook=pre_hook)
                for c in configs.select(space, family)]
        cache[family] = triton.autotune(cfgs, key=list(key))(kernel)
    return cache[family]


def _set_blocks(nargs: dict) -> None:
    """Give the tensor descriptors the tile shapes of the config about to run (autotune pre-hook)."""
    if nargs.get("DQ") is None:
        return
    nargs["DQ"].block_shape = [1, nargs["BLOCK_M"], 1, nargs["D"]]
    for name in ("DKW", "DVW", "DKS", "DVS"):
        nargs[name].block_shape = [1, nargs["BLOCK_N"], 1, nargs["D"]]


def _kernel(family: str):
    return autotuned(_TUNED, _attn_fwd, configs.ATTENTION, family, key=("D", "TMA"), pre_hook=_set_blocks)


def tma_usable(*xs: torch.Tensor) -> bool:
    """Whether tensor descriptors can describe these [B, L, H, D] tensors: Triton has them, no segment
    is empty, the last dim is contiguous and the base and every other stride are 16-byte aligned."""
    if TensorDescriptor is None:
        return False
    for x in xs:
        size = x.element_size()
        if x.numel() == 0 or x.stride(-1) != 1 or x.data_ptr() % 16 or any(st * size % 16 for st in x.stride()[:-1]):
            return False
    return True


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the Triton path can run for tensors on x's device."""
    return triton is not None and (x.is_cuda or configs.interpreter_ready())


def launch_opts(block: tuple) -> dict:
    """num_warps / num_stages of a forced (BLOCK_M, BLOCK_N[, num_warps, num_stages]) block."""
    warps, stages = (block[2], block[3]) if len(block) == 4 else (4 if block[0] <= 64 else 8, 2)
    return {"num_warps": warps, "num_stages": stages}


def sink_multipliers(sink_cos: torch.Tensor, sink_sin: torch.Tensor, Ls: int, D: int, device) -> tuple:
    """(COS, SIN) kernel arguments: the sink's [Ls, D/2] rows on `device`, contiguous (a 1-element
    placeholder when the sink is empty: the kernel then reads nothing)."""
    if Ls == 0:
        dummy = torch.zeros(1, dtype=torch.float16, device=device)
        return dummy, dummy
    for name, t in (("sink_cos", sink_cos), ("sink_sin", sink_sin)):
        if tuple(t.shape) != (Ls, D // 2):
            raise ValueError(f"{name} must be [Ls, D/2] = [{Ls}, {D // 2}], not {list(t.shape)}")
    return sink_cos.to(device).contiguous(), sink_sin.to(device).contiguous()


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def two_segment_attention(q, k_win, v_win, k_sink, v_sink, sink_cos, sink_sin, scale=None,
                          backend: str = "auto", block: tuple | None = None,
                          out: torch.Tensor | None = None, tma: bool | None = None) -> torch.Tensor:
    """softmax(q [k_win; rope(k_sink)]^T * scale) [v_win; v_sink] without concatenating the segments.

    q [B, Lq, H, D]; k_win, v_win [B, Lw, H, D] (keys roped); k_sink, v_sink [B, Ls, H, D] (keys
    un-roped); sink_cos, sink_sin [Ls, D/2]: the sink keys' RoPE multipliers (the model's fp16 table
    at the sink positions, sin negated for negative time positions: lowvram.model.rope.sink_rope_tables,
    the same for all layers of a forward). Lw >= 0, Ls >= 0, Lw + Ls > 0. Returns [B, Lq, H, D] in q.dtype.
    backend: "auto" (Triton on CUDA or under the interpreter, else torch), "triton", "torch".
    block: (BLOCK_M, BLOCK_N[, num_warps, num_stages]) to bypass autotuning (tests, benchmarks).
    out: an optional [B, Lq, H, D] tensor to write into (Triton path).
    tma: load tiles through tensor descriptors (None: configs.ATTENTION_TMA for the device family,
    where the tensors allow it; True/False force it, True failing when they do not).
    """
    B, Lq, H, D = q.shape
    Lw, Ls = k_win.shape[1], k_sink.shape[1]
    if Lw + Ls == 0:
        raise ValueError("two_segment_attention needs at least one key")
    use_triton = backend == "triton" or (backend == "auto" and triton_usable(q))
    if not use_triton:
        res = attention_torch(q, k_win, v_win, k_sink, v_sink, sink_cos, sink_sin, scale)
        return res if out is None else out.copy_(res)
    if triton is None:
        raise RuntimeError("backend='triton' needs triton installed")
    q, k_win, v_win, k_sink, v_sink = map(_lastdim_contiguous, (q, k_win, v_win, k_sink, v_sink))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cos, sin = sink_multipliers(sink_cos, sink_sin, Ls, D, q.device)
    if out is None:
        out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    family = configs.arch_family(q.device)
    usable = tma_usable(q, k_win, v_win, k_sink, v_sink)
    if tma and not usable:
        raise ValueError("tma=True needs Triton tensor descriptors, non-empty segments and 16-byte aligned strides")
    tma = usable if tma is None and configs.ATTENTION_TMA.get(family, False) else bool(tma)
    descs = [TensorDescriptor.from_tensor(x, [1, 16, 1, D]) for x in (q, k_win, v_win, k_sink, v_sink)] \
        if tma else [None] * 5  # block shapes set per config (_set_blocks)
    args = (q, k_win, v_win, k_sink, v_sink, cos, sin, out, *descs,
            q.stride(0), q.stride(1), q.stride(2), k_win.stride(0), k_win.stride(1), k_win.stride(2),
            v_win.stride(0), v_win.stride(1), v_win.stride(2), k_sink.stride(0), k_sink.stride(1),
            k_sink.stride(2), v_sink.stride(0), v_sink.stride(1), v_sink.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            H, Lq, Lw, Ls, scale * LOG2E)
    up = configs.interpreting()
    if block is not None:
        grid = (triton.cdiv(Lq, block[0]), B * H)
        _set_blocks(dict(DQ=descs[0], DKW=descs[1], DVW=descs[2], DKS=descs[3], DVS=descs[4],
                         BLOCK_M=block[0], BLOCK_N=block[1], D=D))
        _attn_fwd[grid](*args, D=D, BLOCK_M=block[0], BLOCK_N=block[1], UPCAST=up, TMA=tma,
                        **launch_opts(block))
    else:
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _kernel(family)[grid](*args, D=D, UPCAST=up, TMA=tma)
    return out


def bench_multipliers(Ls: int, D: int, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (cos, sin) [Ls, D/2] of random angles: stand-ins for the model's sink multipliers (benchmarks)."""
    ang = torch.rand(Ls, D // 2, device=device, generator=gen) * (2 * math.pi)
    return ang.cos().half(), ang.sin().half()


def bench_attention(B=1, Lq=3168, Lw=12672, Ls=2640, H=40, D=128, device="cuda") -> dict:
    """Median time (ms) and TFLOP/s of this kernel at one shape, random bf16 inputs."""
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(B, Lq, H, D, device=device, dtype=torch.bfloat16, generator=gen)
    kw, vw = (torch.randn(B, Lw, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    ks, vs = (torch.randn(B, Ls, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    cos, sin = bench_multipliers(Ls, D, device, gen)
    fn = lambda: two_segment_attention(q, kw, vw, ks, vs, cos, sin)  # noqa: E731
    ms = triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
    flops = 4.0 * B * H * Lq * (Lw + Ls) * D
    return {"ms": ms, "tflops": flops / ms / 1e9}
