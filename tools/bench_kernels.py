"""Benchmark the Triton kernels at the model's real shapes against torch and library baselines.

    python3 tools/bench_kernels.py            # full run on a CUDA GPU (~5 min on an H100)
    python3 tools/bench_kernels.py --sweep    # also time each candidate tile config explicitly
    python3 tools/bench_kernels.py --tiny     # dry run of the whole script on the CPU interpreter

Attention: B in {1, 4}, 3168 queries, window 12672 + sink 2640 keys, 40 heads x 128: ours (bf16,
8-bit) vs torch SDPA (flash, cuDNN) on the concatenated keys. GEMM: M in {3168, 12672},
(K, N) in {(5120, 5120), (5120, 13824), (13824, 5120)}: ours with the activation quantization
included vs bare torch._int_mm / torch._scaled_mm (row-wise), bf16 cuBLAS, optimum-quanto and
bitsandbytes INT8 layers. Every variant is checked for correctness at the real shape before it is
timed (median of CUDA-event timings after warm-up, triton.testing.do_bench). Prints a table last;
writes bench_kernels.json under --out (default $OUT or the working directory).
One DiT block's non-attention work fused vs unfused (shared 8-bit inputs, GELU epilogue): tools/bench_block.py.
"""

from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowvram.kernels import attention8 as A8  # noqa: E402
from lowvram.kernels import configs, gemm  # noqa: E402
from lowvram.kernels import reference as R  # noqa: E402
from lowvram.kernels import rowquant as RQ  # noqa: E402
from lowvram.kernels.attention import two_segment_attention  # noqa: E402
from lowvram.metrics import sqnr_db  # noqa: E402
from lowvram.model.rope import RopeTable, sink_rope_tables  # noqa: E402

BF = torch.bfloat16


def timed(fn) -> float:
    """Median milliseconds of fn(): CUDA events via do_bench on a GPU, wall clock on the CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def unavailable_row(why):
    """A row's function for a candidate that cannot run here: raises `why`, which guarded() reports as n/a."""
    def fail():
        raise RuntimeError(why)
    return fail


def guarded(name, fn):
    """(value, None) or (None, 'n/a: reason') when a baseline cannot run here."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - a missing or failing baseline is reported, not fatal
        return None, f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"


# ---------------------------------------------------------------- attention

def attention_inputs(B, Lq, Lw, Ls, H, D, dev, seed=0):
    """Random inputs with the sink's multipliers gathered from the model's table at random positions."""
    g = torch.Generator(dev).manual_seed(seed)
    rnd = lambda *s, sd=1.0: torch.randn(*s, device=dev, generator=g) * sd  # noqa: E731
    k = rnd(B, Lw, H, D, sd=1.5)
    k[..., torch.randperm(D, device=dev, generator=g)[:4]] += 8.0  # outlier channels
    pos = torch.stack([torch.randint(-8, 40, (Ls,), device=dev, generator=g),
                       torch.randint(0, 44, (Ls,), device=dev, generator=g),
                       torch.randint(0, 24, (Ls,), device=dev, generator=g)], dim=-1)
    cos, sin = sink_rope_tables(RopeTable.build(D, 1024, device=dev), pos)
    return dict(q=rnd(B, Lq, H, D, sd=1.5).to(BF), k_win=k.to(BF), v_win=rnd(B, Lw, H, D).to(BF),
                k_sink=rnd(B, Ls, H, D, sd=1.5).to(BF), v_sink=rnd(B, Ls, H, D).to(BF), sink_cos=cos, sink_sin=sin)


def subset(inp, nq, heads):
    """The first nq queries and the given heads of every input (for a float64 reference)."""
    out = {k: v[:, :, heads] if v.dim() == 4 else v for k, v in inp.items()}
    out["q"] = out["q"][:, :nq]
    return out


def attention_candidates(row, q, k, v):
    """8-bit attentions from other libraries at the same shape (issue 15), each where it installs: cuDNN's FP8
    SDPA through nvidia-cudnn-frontend (kernels/cudnn8.py: with its per-call quantization of bf16 Q/K/V, and
    the kernel alone on pre-quantized inputs), SageAttention 2 (kernels/sage.py: INT8 QK^T, FP8 PV; each of its
    kernels this GPU can run, the sm_90 one also split into its quantization and the kernel alone) and FlashAttention
    4 (kernels/flash4.py: exact bf16, checked by the bf16 rule).
    q [B, Lq, H, D], k / v [B, Lk, H, D] bf16 (the window and the roped sink concatenated)."""
    from lowvram.kernels import cudnn8

    why = cudnn8.unavailable(q.device)
    if why is None:
        x = cudnn8.quantize_qkv(q, k, v)
        row("cand cuDNN FP8 SDPA, quantization included", lambda: cudnn8.fp8_sdpa(q, k, v), "cand")
        row("cand cuDNN FP8 SDPA, kernel alone", lambda: cudnn8.fp8_sdpa_quantized(
            x["q"], x["k"], x["v"], x["sq"], x["sk"], x["sv"]), "cand")
        amax = torch.zeros(1, 1, 1, 1, device=q.device)
        cudnn8.fp8_sdpa_quantized(x["q"], x["k"], x["v"], x["sq"], x["sk"], x["sv"], amax_o=amax)  # calibration
        so = amax / cudnn8.FP8_MAX
        row("cand cuDNN FP8 SDPA, kernel alone, output scale calibrated", lambda: cudnn8.fp8_sdpa_quantized(
            x["q"], x["k"], x["v"], x["sq"], x["sk"], x["sv"], so=so), "cand")
        for name in ("q", "k", "v"):  # which quantization costs the accuracy: one operand 8-bit at a time
            def one(name=name):  # (K smoothed: the same attention)
                ops = {"q": q, "k": k, "v": v, name: (x[name].float() * x["s" + name].view(1)).to(torch.bfloat16)}
                return F.scaled_dot_product_attention(*(ops[n].transpose(1, 2) for n in "qkv")).transpose(1, 2)
            row(f"  diag: only {name.upper()} in e4m3 (per tensor), cuDNN bf16", one, "cand")
    else:
        row("cand cuDNN FP8 SDPA", unavailable_row(why), "cand")

    from lowvram.kernels import sage as S

    why = S.unavailable(q.device)
    if why is None:
        row("cand SageAttention 2 (sageattn: INT8 QK, FP8 PV), quantization included",
            lambda: S.sage_attention(q, k, v), "cand")
        if S.kernel_for(torch.cuda.get_device_capability(q.device)) == "sm90":
            x = S.quantize_sm90(q, k, v)
            row("  SageAttention 2 sm90, kernel alone", lambda: S.kernel_sm90(x), "cand")
            row("  SageAttention 2 sm90, its quantization alone", lambda: S.quantize_sm90(q, k, v) and q, "time")
        from sageattention import core

        if getattr(core, "SM89_ENABLED", False):  # the RTX 40 path, here for its accuracy (mma.sync, not Hopper's)
            row("  SageAttention 2 sm89 kernel (RTX 40's), fp32+fp16 PV", lambda: core.sageattn_qk_int8_pv_fp8_cuda(
                q, k, v, tensor_layout="NHD", pv_accum_dtype="fp32+fp16"), "cand")
        row("  SageAttention 2 Triton (RTX 30's), fp16 PV", lambda: core.sageattn_qk_int8_pv_fp16_triton(
            q, k, v, tensor_layout="NHD"), "cand")
    else:
        row("cand SageAttention 2", unavailable_row(why), "cand")
    from lowvram.kernels import flash4

    why = flash4.unavailable(q.device)
    row("cand FlashAttention 4 (flash-attn-4, bf16)",
        (lambda: flash4.fa4_attention(q, k, v)) if why is None else unavailable_row(why), "bf16")


def bench_attention_shape(B, Lq, Lw, Ls, H, D, dev, sweep):
    inp = attention_inputs(B, Lq, Lw, Ls, H, D, dev)
    cache = A8.kv8_alloc(B, Lw, H, D, dev)
    for s in range(0, Lw, 3168):  # ring writes of one chunk at a time, as the model does
        A8.kv8_write(cache, s, inp["k_win"][:, s:s + 3168], inp["v_win"][:, s:s + 3168])
    sink = {k: inp[k] for k in ("q", "k_sink", "v_sink", "sink_cos", "sink_sin")}
    nq, heads = min(256, Lq), slice(0, 2)
    sub = subset(inp, nq, heads)
    ref = R.attention_reference(**sub)
    base = R.rel_error(R.attention_reference(**sub, compute_dtype=BF), ref)
    k_cat = torch.cat([inp["k_win"], R.rope_sink_keys(inp["k_sink"], inp["sink_cos"], inp["sink_sin"])], 1)
    k_cat = k_cat.transpose(1, 2)
    v_cat = torch.cat([inp["v_win"], inp["v_sink"]], 1).transpose(1, 2)
    qt = inp["q"].transpose(1, 2)
    flops = 4.0 * B * H * Lq * (Lw + Ls) * D
    group = f"attention B={B} {Lq}x({Lw}+{Ls})x{H}x{D}"
    rows = []

    def row(name, fn, kind, refs=(ref, base), n_keys=Lw + Ls):
        out, why = guarded(name, fn)
        if why is not None:
            rows.append(dict(group=group, variant=name, check=why))
            return
        o, (ref_, base_) = out[:, :nq, heads], refs
        if kind == "time":  # a part of another row's work, timed alone (no output of its own to check)
            ms = timed(fn)
            rows.append(dict(group=group, variant=name, ms=ms, check="(time only)"))
            return
        if kind in ("8bit", "cand"):
            db = sqnr_db(ref_, o)
            check, ok = f"SQNR {db:.1f} dB (>= 30)", db >= 30
            out_ok = ok
            ok = ok or kind == "cand"  # another library's kernel: timed whatever its accuracy, which is reported
        else:
            err = R.rel_error(o, ref_)
            check, ok = f"err {err:.1e} (<= {2 * base_ + 1e-3:.1e})", err <= 2 * base_ + 1e-3
        ms = timed(fn) if ok else None
        fl = flops * n_keys / (Lw + Ls)
        passed = out_ok if kind in ("8bit", "cand") else ok
        rows.append(dict(group=group, variant=name, ms=ms, tflops=fl / ms / 1e9 if ms else None,
                         check=check + ("" if passed else " FAILED")))

    row("ours bf16 (triton)", lambda: two_segment_attention(**inp), "bf16")
    row("  ours bf16, pointer loads (tma=False)", lambda: two_segment_attention(**inp, tma=False), "bf16")
    row("ours 8-bit (triton8)", lambda: A8.two_segment_attention8(**sink, win=cache), "8bit")
    if torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in (("torch SDPA flash", SDPBackend.FLASH_ATTENTION),
                         ("torch SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(qt, k_cat, v_cat).transpose(1, 2)
            row(name, sdpa, "bf16")
        # what the model's sdpa path pays per layer around that kernel: the sink roped and concatenated behind
        # the window (torch.cat of both, attend_two_segments), or roped and written behind the window in the
        # window's own buffer (HostKVCache.joined: the host-cache profiles)
        k_sink, v_sink, cs = inp["k_sink"], inp["v_sink"], (inp["sink_cos"], inp["sink_sin"])
        buf_k = torch.empty(B, Lw + Ls, H, D, dtype=BF, device=dev)
        buf_v = torch.empty_like(buf_k)
        buf_k[:, :Lw], buf_v[:, :Lw] = inp["k_win"], inp["v_win"]

        def cat_path():
            ks = R.rope_sink_keys(k_sink, *cs)
            return F.scaled_dot_product_attention(inp["q"].transpose(1, 2), torch.cat([inp["k_win"], ks], 1).transpose(1, 2),
                                                  torch.cat([inp["v_win"], v_sink], 1).transpose(1, 2)).transpose(1, 2)

        def joined_path():
            buf_k[:, Lw:].copy_(R.rope_sink_keys(k_sink, *cs))
            buf_v[:, Lw:].copy_(v_sink)
            return F.scaled_dot_product_attention(inp["q"].transpose(1, 2), buf_k.transpose(1, 2),
                                                  buf_v.transpose(1, 2)).transpose(1, 2)
        row("  torch SDPA (default) + sink roped and concatenated per call", cat_path, "bf16")
        row("  torch SDPA (default) + sink roped and written behind the window", joined_path, "bf16")
        attention_candidates(row, inp["q"], k_cat.transpose(1, 2), v_cat.transpose(1, 2))
    else:
        row("torch SDPA (cpu)", lambda: F.scaled_dot_product_attention(qt, k_cat, v_cat).transpose(1, 2), "bf16")
    sdpa_ms = [r["ms"] for r in rows if r["variant"].startswith("torch SDPA") and r.get("ms")]
    for r in rows:
        if r["variant"].startswith(("ours", "cand")) and r.get("ms") and sdpa_ms:
            r["speedup"] = min(sdpa_ms) / r["ms"]
    # diagnosis: each segment alone (where does the time go: the window loop or the roped sink loop?)
    for seg, keep in (("window only", "win"), ("sink only", "sink")):
        part = dict(inp)
        if keep == "win":
            part.update(k_sink=inp["k_sink"][:, :0], v_sink=inp["v_sink"][:, :0], sink_cos=inp["sink_cos"][:0],
                        sink_sin=inp["sink_sin"][:0])
        else:
            part.update(k_win=inp["k_win"][:, :0], v_win=inp["v_win"][:, :0])
        psub = subset(part, nq, heads)
        pref = R.attention_reference(**psub)
        pbase = R.rel_error(R.attention_reference(**psub, compute_dtype=BF), pref)
        row(f"  ours bf16, {seg}", lambda part=part: two_segment_attention(**part), "bf16",
            (pref, pbase), Lw if keep == "win" else Ls)
        if keep == "win":
            psink = dict(sink, **{k: part[k] for k in ("k_sink", "v_sink", "sink_cos", "sink_sin")})
            row(f"  ours 8-bit, {seg}", lambda psink=psink: A8.two_segment_attention8(**psink, win=cache),
                "8bit", (pref, pbase), Lw)
    if sweep:
        for blk in SWEEP_ATTENTION:
            row(f"  sweep bf16 {blk}", lambda blk=blk: two_segment_attention(**inp, block=blk), "bf16")
        for blk in SWEEP_ATTENTION:
            row(f"  sweep 8-bit {blk}", lambda blk=blk: A8.two_segment_attention8(**sink, win=cache, block=blk),
                "8bit")
    return rows


SWEEP_ATTENTION = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3),
                   (128, 64, 4, 3)]

# ---------------------------------------------------------------- GEMM

SWEEP_GEMM = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
              for bm, bn, bk, w, s in [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3),
                                       (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (64, 256, 128, 4, 4)]]


def quanto_layer(K, N, x, dev):
    from optimum.quanto import Calibration, freeze, qint8, quantize

    lin = torch.nn.Sequential(torch.nn.Linear(K, N, dtype=BF, device=dev))  # quanto swaps children only
    quantize(lin, weights=qint8, activations=qint8)
    with Calibration():
        lin(x)
    freeze(lin)
    return lin


def bnb_layer(K, N, dev):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False, threshold=0.0)
    return lin.to(dev)


def note_config(r):
    """Record the tile config the autotuner picked for the GEMM call just timed (it can differ run to run)."""
    tuned = gemm._TUNED.get(configs.arch_family()) if r else None
    if tuned is not None and getattr(tuned, "best_config", None) is not None:
        r["config"] = str(tuned.best_config)
        r["check"] = r.get("check", "") + f"; {r['config'][:70]}"


def bench_gemm_shape(M, K, N, dev, sweep):
    g = torch.Generator(dev).manual_seed(M + K + N)
    x = torch.randn(M, K, device=dev, generator=g)
    x[:, torch.randperm(K, device=dev, generator=g)[:8]] *= 20.0
    x = x.to(BF)
    w = torch.randn(N, K, device=dev, generator=g) * 0.02
    b = torch.randn(N, device=dev, generator=g).to(BF)
    wq, ws = RQ.quantize_rows_int8(w)
    wf, wfs = RQ.quantize_rows_fp8(w)
    xq, xs = RQ.quantize_rows_int8(x)
    xf, xfs = RQ.quantize_rows_fp8(x)
    wb = w.to(BF)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref8 = R.int8_linear_reference(x, wq, ws, b, torch.float32)
    reff = R.fp8_linear_reference(x, wf, wfs, b, torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = prev
    full = x.float() @ w.T + b.float()
    group = f"GEMM M={M} K={K} N={N}"
    flops = 2.0 * M * N * K
    rows = []

    def row(name, fn, ref=None, floor=None):
        out, why = guarded(name, fn)
        if why is not None:
            rows.append(dict(group=group, variant=name, check=why))
            return None
        if ref is not None:
            base = R.rel_error(ref.to(BF), ref)
            err = R.rel_error(out, ref)
            db = sqnr_db(full, out)
            ok = err <= 2 * base + 1e-3 and db >= floor
            check = f"err {err:.1e} (<= {2 * base + 1e-3:.1e}), SQNR {db:.1f} dB"
        elif floor is not None:
            db = sqnr_db(full, out)
            ok, check = db >= floor, f"SQNR {db:.1f} dB"
        else:
            ok, check = True, "bare (no check)"
        ms = timed(fn) if ok else None
        r = dict(group=group, variant=name, ms=ms, tflops=flops / ms / 1e9 if ms else None,
                 check=check + ("" if ok else " FAILED"))
        rows.append(r)
        return r

    # with outlier input channels per-token INT8 itself stays under 30 dB (22.9-24.6 dB measured on the H200):
    # judge our kernel against the W8A8 scheme's own SQNR, as tests/test_kernels_gemm.py does
    floor8 = min(30.0, sqnr_db(full, ref8) - 0.5)
    ours8 = row("ours INT8 (quant incl.)", lambda: gemm.int8_linear(x, wq, ws, b), ref8, floor8)
    note_config(ours8)
    oursf = row("ours FP8 triton (quant incl.)", lambda: gemm.fp8_linear(x, wf, wfs, b, engine="triton"), reff, 25.0)
    note_config(oursf)
    oursfs = row("ours FP8 quant + _scaled_mm", lambda: gemm.fp8_linear(x, wf, wfs, b, engine="scaled_mm"), reff, 25.0)
    for single, tag in ((None, "default"), (False, "two-pass")):
        q_ms = timed(lambda single=single: gemm.quantize_rows(x, single=single)) if gemm.triton_usable(x) else None
        rows.append(dict(group=group, variant=f"  our quant kernel alone, {tag}", ms=q_ms, check="int8, per token"))
    im = row("torch._int_mm bare", lambda: torch._int_mm(xq, wq.t()))
    sm = row("torch._scaled_mm rowwise bare",
             lambda: torch._scaled_mm(xf, wf.t(), scale_a=xfs[:, None], scale_b=wfs[None, :], out_dtype=BF))
    row("bf16 cuBLAS (F.linear)", lambda: F.linear(x, wb, b), None, 35.0)
    lq, why = guarded("quanto", lambda: quanto_layer(K, N, x, dev))
    if lq is not None:
        row("optimum-quanto W8A8 qint8", lambda: lq(x))
    else:
        rows.append(dict(group=group, variant="optimum-quanto W8A8 qint8", check=why))
    lb, why = guarded("bnb", lambda: bnb_layer(K, N, dev))
    if lb is not None:
        row("bitsandbytes Linear8bitLt", lambda: lb(x))
    else:
        rows.append(dict(group=group, variant="bitsandbytes Linear8bitLt", check=why))
    for ours, bare in ((ours8, im), (oursf, sm), (oursfs, sm)):
        if ours and bare and ours.get("ms") and bare.get("ms"):
            ours["speedup"] = bare["ms"] / ours["ms"]
    if sweep:
        for c in SWEEP_GEMM:
            tag = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
            row(f"  sweep INT8 {tag}", lambda c=c: gemm.int8_linear(x, wq, ws, b, block=c), ref8, floor8)
            row(f"  sweep FP8 {tag}", lambda c=c: gemm.fp8_linear(x, wf, wfs, b, engine="triton", block=c),
                reff, 25.0)
    return rows


# ---------------------------------------------------------------- main

def resource_report() -> list[str]:
    """Registers, spills, shared memory of every compiled variant (Triton's own compile report)."""
    from lowvram.kernels import attention as A

    lines = []
    for fn in (A._attn_fwd, A8._attn8_fwd, gemm._w8a8_gemm, gemm._quant_rows):
        for dev_cache in getattr(fn, "device_caches", {}).values():
            for k in dev_cache[0].values():
                md = k.metadata
                lines.append(f"{fn.__name__:12s} warps {md.num_warps} stages {md.num_stages} shared {md.shared:6d} "
                             f"regs {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')} "
                             f"{str(getattr(k, 'src', None) and getattr(k.src, 'constants', ''))[:160]}")
    return lines



# (row key, header, width, format, shown when the row has no value)
KERNEL_COLUMNS = (("ms", "ms", 8, ".3f", "-"), ("tflops", "TFLOP/s", 8, ".1f", "-"), ("speedup", "speed-up", 8, ".2f", ""))


def fmt_table(rows, label=("variant", "variant", 34), columns=KERNEL_COLUMNS) -> str:
    """rows under a heading line per "group": the label column (row key, header, width), then the columns, then
    the row's check (tools/bench_block.py prints its table with this too)."""
    key, header, width = label
    lines, group = [], None
    for r in rows:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"\n{group}")
            lines.append(f"  {header:{width}s} " + " ".join(f"{h:>{w}s}" for _, h, w, _, _ in columns) + "  check")
        cells = [f"{r[k]:{w}{f}}" if r.get(k) else f"{blank:>{w}s}" for k, _, w, f, blank in columns]
        lines.append(f"  {r[key]:{width}s} " + " ".join(cells) + f"  {r.get('check', '')}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="time every candidate tile config explicitly")
    ap.add_argument("--quick", action="store_true", help="B=1 attention and one GEMM shape only")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU interpreter (dry run)")
    ap.add_argument("--only", choices=["attention", "gemm"], help="run one half of the benchmark")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_kernels.json")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    t0 = time.time()
    if a.tiny:
        att = [(1, 33, 100, 17, 2, 64)]
        gem = [(33, 96, 80)]
    else:
        att = [(1, 3168, 12672, 2640, 40, 128)] + ([] if a.quick else [(4, 3168, 12672, 2640, 40, 128)])
        gem = [(M, K, N) for M in (3168, 12672) for K, N in ((5120, 5120), (5120, 13824), (13824, 5120))]
        gem = gem[1:2] if a.quick else gem
    att = [] if a.only == "gemm" else att
    gem = [] if a.only == "attention" else gem
    rows = []
    for i, shape in enumerate(att):  # the sweep (if asked) runs at the first shape of each kind
        rows += bench_attention_shape(*shape, dev, a.sweep and i == 0)
        print(fmt_table([r for r in rows if r["group"] == rows[-1]["group"]]), flush=True)
    for i, shape in enumerate(gem):
        rows += bench_gemm_shape(*shape, dev, a.sweep and i == 1)
        torch.cuda.empty_cache() if dev == "cuda" else None
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
                torch=torch.__version__, triton=__import__("triton").__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
                seconds=round(time.time() - t0, 1))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if dev == "cuda":
        res, why = guarded("resources", resource_report)
        print("\n".join(res) if res else why)
    print(f"\n{meta}")
    print(fmt_table(rows))


if __name__ == "__main__":
    main()
