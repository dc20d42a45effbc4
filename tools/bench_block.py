"""Benchmark one DiT block's non-attention work, fused (quantize once, norms writing 8-bit rows, GELU in ffn.0's
epilogue) against unfused (each W8A8 layer quantizing its own input, GELU as its own pass), issue 15.

    python3 tools/bench_block.py --out $OUT          # H200: dim 5120, 40 heads, ffn 13824, 3 frames x 1056 tokens,
                                                     # B = 1 and 4, INT8 and FP8 random weights (~2 min)
    python3 tools/bench_block.py --quick             # tiny shapes on the CPU interpreter (a dry run, ~1.5 min)

Parts, each timed fused and unfused (the model's own code: Block._norm, Block.ffn_chunks, Block.forward):
  norm -> 8-bit rows    layer_norm_mod + quantize_rows vs layer_norm_mod_quant (bit-equal expected)
  q/k/v from h          three W8A8 layers on one bf16 h: three quantizations vs one (bit-equal expected)
  norm1 -> q/k/v        the two above together (bit-equal expected)
  norm2 -> FFN, chunk F FFN_CHUNK_FRAMES = F latent frames per chunk (1 is the model's default): GELU in ffn.0's
                        epilogue and ffn.2's one-pass quantization vs GEMM, nn.GELU, quantize + GEMM (bounded: tanh)
  block, no attention   Block.forward with attend = v (q/k rms+rope, o, cross-attention, gated residuals, FFN)
Before timing, every fused output is compared with the unfused one: max |diff|, the share of bit-equal elements,
and for the bounded parts the relative error against half the activation quantization's own effect (the unfused
output vs the weight-only reference backend). A part that fails its check is not timed. Times: median of CUDA
event timings (triton.testing.do_bench), wall clock on the CPU. JSON: bench_block.json under --out.
"""

from __future__ import annotations

import os
import sys

if "--quick" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import fmt_table  # noqa: E402

from lowvram.kernels import fused, gemm  # noqa: E402
from lowvram.kernels import reference as R  # noqa: E402
from lowvram.model import layers  # noqa: E402
from lowvram.model.rope import RopeTable, grid_positions  # noqa: E402
from lowvram.quantize import fuse  # noqa: E402
from lowvram.quantize.linear import QuantLinear, set_gemm_backend  # noqa: E402

BF = torch.bfloat16
FULL = dict(dim=5120, heads=40, ffn=13824, grid=(44, 24), frames=3, batches=(1, 4))  # 704x384: 1056 tokens a frame
QUICK = dict(dim=96, heads=2, ffn=200, grid=(11, 1), frames=3, batches=(1, 2))
LINEARS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def timed(fn) -> float:
    """Median milliseconds of fn(): CUDA events via do_bench on a GPU; on the CPU (a dry run, fn already ran
    for its check) the wall clock of one call."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def make_block(scheme, s, dev, backend):
    """A Block of random weights (fan-in scaled, modulation and norms near their trained scale), its ten linears
    W8A8 in `scheme`; the bf16 weights are freed as each layer is quantized."""
    torch.manual_seed(0)
    with torch.device(dev):
        blk = layers.Block(s["dim"], s["ffn"], s["heads"]).to(BF)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.ndim > 1 else 1 + 0.1 * torch.randn_like(p))
        for name in LINEARS:
            parent, _, child = name.rpartition(".")
            holder = blk.get_submodule(parent)
            setattr(holder, child, QuantLinear.from_linear(getattr(holder, child), scheme))
    set_gemm_backend(blk, backend)
    return blk


def inputs(b, s, dev):
    g = torch.Generator().manual_seed(b)
    (hh, ww), C = s["grid"], s["dim"]
    L = s["frames"] * hh * ww
    x = torch.randn(b, L, C, generator=g).to(dev, BF)
    e0 = (torch.randn(b, s["frames"], 6, C, generator=g) * 0.1).to(dev)
    ctx = torch.randn(1, 512, C, generator=g).to(dev, BF)
    pos = grid_positions(range(s["frames"]), range(hh), range(ww))
    rope = tuple(t.to(dev) for t in RopeTable.build(C // s["heads"], 1024).gather(pos))
    return x, e0, ctx, rope


def compare(a, b, exact, noise=None) -> tuple[bool, str]:
    """fused a vs unfused b: bit-equality where expected, else rel. error <= noise / 2 (module docstring)."""
    a, b = (torch.cat([t.reshape(-1).float() for t in v]) if isinstance(v, (list, tuple)) else v.float()
            for v in (a, b))
    nan = a.isnan() | b.isnan()
    diff = (a - b)[~nan].abs().max().item() if (~nan).any() else 0.0
    same = ((a == b) | (a.isnan() & b.isnan())).float().mean().item()  # NaN where both have it counts as equal
    rel = R.rel_error(a[~nan], b[~nan])
    text = f"max|d| {diff:.2e}, bit-equal {100 * same:.3f}%, rel {rel:.1e}" + (f", {int(nan.sum())} NaN" if nan.any() else "")
    if exact:  # the GPU compiles the norm kernel twice (h stored / h quantized): a few codes may differ by one
        return same >= 0.999 and rel <= 1e-5, text + " (bit-equal expected, >= 99.9% on a GPU)"
    return rel <= noise / 2, text + f" (<= {noise / 2:.1e}: half the act. quantization's {noise:.1e})"


def bench_case(scheme, b, s, dev, backend, norm_backend):
    blk = make_block(scheme, s, dev, backend)
    x, e0, ctx, rope = inputs(b, s, dev)
    frames = s["frames"]
    mods = (blk.modulation.float().unsqueeze(1) + e0).unbind(2)  # shift1, scale1, gate1, shift2, scale2, gate2
    qkv = (blk.self_attn.q, blk.self_attn.k, blk.self_attn.v)
    eps = blk.norm1.eps
    norm1 = dict(shift=mods[0], scale=mods[1], frames=frames, out_dtype=BF)
    norm2 = dict(shift=mods[3], scale=mods[4], frames=frames, out_dtype=BF)
    h = fused.layer_norm_mod(x, eps, **norm1, backend=norm_backend)
    fp8 = scheme == "fp8"

    def norm_quant(on):
        if on:
            qr = fused.layer_norm_mod_quant(x, eps, **norm1, fp8=fp8, backend=norm_backend)[1]
            return qr.q.view(torch.uint8), qr.scale
        q, sc = gemm.quantize_rows(fused.layer_norm_mod(x, eps, **norm1, backend=norm_backend).reshape(-1, s["dim"]),
                                   fp8=fp8)
        return q.view(torch.uint8), sc

    def proj(on, hh):
        hh = fuse.shared(hh, qkv) if on else hh
        return [m(hh) for m in qkv]

    def norm1_qkv(on):
        layers.set_fuse(blk, on)
        return proj(on, blk._norm(qkv, x, eps, **norm1))

    def ffn(on, chunk):
        layers.set_fuse(blk, on)
        layers.FFN_CHUNK_FRAMES, rows = chunk, layers.FFN_MIN_ROWS
        layers.FFN_MIN_ROWS = 0  # exactly `chunk` frames per chunk
        try:
            return blk.ffn_chunks(blk._norm((blk.ffn[0],), x, eps, **norm2), frames)
        finally:
            layers.FFN_CHUNK_FRAMES, layers.FFN_MIN_ROWS = 1, rows

    def block(on):
        layers.set_fuse(blk, on)
        return blk(x, e0, ctx, lambda q, k, v: v, frames, rope=rope)

    def weight_only(fn):  # the same part with the weight-only reference backend: no activation quantization
        set_gemm_backend(blk, "reference")
        try:
            return fn(False)
        finally:
            set_gemm_backend(blk, backend)

    parts = [("norm -> 8-bit rows", norm_quant, True), ("q/k/v from h", lambda on: proj(on, h), True),
             ("norm1 -> q/k/v", norm1_qkv, True)]
    parts += [(f"norm2 -> FFN, chunk {c}", lambda on, c=c: ffn(on, c), False) for c in (1, frames)]
    parts += [("block, no attention", block, False)]
    per_frame = s["grid"][0] * s["grid"][1]
    group = f"{scheme.upper()} B={b} L={frames}x{per_frame} C={s['dim']} ffn={s['ffn']}"
    rows = []
    with torch.no_grad():
        for name, fn, exact in parts:
            a, ref = fn(True), fn(False)
            noise = None if exact else R.rel_error(ref, weight_only(fn))
            ok, check = compare(a, ref, exact, noise)
            del a, ref
            row = dict(group=group, part=name, check=check + ("" if ok else " FAILED"))
            if ok:
                row.update(unfused_ms=timed(lambda: fn(False)), fused_ms=timed(lambda: fn(True)))
                row["speedup"] = row["unfused_ms"] / row["fused_ms"]
            rows.append(row)
        layers.set_fuse(blk, True)
        rows.append(gelu_row(blk, h[:, :per_frame], group, fp8))
    print(fmt(rows), flush=True)
    return rows


def gelu_row(blk, h, group, fp8) -> dict:
    """ffn.0's epilogue GELU against its GEMM -> nn.GELU on one frame's rows h [B, per_frame, C]: the share of
    bit-equal elements, and whether all lie within tests/test_kernels_gemm.py's bound (one bf16 unit, or
    |y| 2^-22 where 1 + tanh cancels), the row absmax exact."""
    xr = fuse.quantize_input(h, fp8)
    f0 = blk.ffn[0]
    g, amax = gemm.gelu_linear(xr.q, xr.scale, f0.qweight, f0.scale, f0.bias)
    y = gemm.w8a8_linear(xr.q, xr.scale, f0.qweight, f0.scale, f0.bias, engine="triton")
    want = torch.nn.functional.gelu(y, approximate="tanh").float()
    d = (g.float() - want).abs()
    within = bool((d <= 2.0 ** -7 * want.abs() + 2.0 ** -22 * y.float().abs()).all())
    exact_max = torch.equal(amax, g.float().abs().amax(1))
    ok = within and exact_max
    return dict(group=group, part="  GELU hidden vs nn.GELU",
                check=f"bit-equal {100 * (g.float() == want).float().mean().item():.4f}%, max|d| {d.max().item():.1e}, "
                      f"within the bound {within}, absmax exact {exact_max}" + ("" if ok else " FAILED"))


def fmt(rows) -> str:
    return fmt_table(rows, ("part", "part (ms)", 26), (("unfused_ms", "unfused", 9, ".3f", "-"),
                                                        ("fused_ms", "fused", 9, ".3f", "-"),
                                                        ("speedup", "speed-up", 8, ".2f", "")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU interpreter (a dry run)")
    ap.add_argument("--schemes", default="int8,fp8", help="comma-separated: int8, fp8")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_block.json")
    a = ap.parse_args()
    # the fused side is what this tool measures (module docstring), the GELU epilogue included, which the model
    # keeps off (quantize.fuse.GELU_EPILOGUE: slower on the H200, measured here)
    fuse.GELU_EPILOGUE = True
    dev = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    s = QUICK if a.quick else FULL
    # on the CPU the GEMMs run interpreted only when named ("auto" is the weight-only reference there)
    backend, norm_backend = ("auto", "auto") if dev == "cuda" else ("triton", "triton")
    t0 = time.time()
    rows = []
    for scheme in a.schemes.split(","):
        if scheme == "fp8" and dev == "cuda" and torch.cuda.get_device_capability() < (8, 9):
            print("fp8 skipped: needs sm_89+")
            continue
        for b in s["batches"]:
            rows += bench_case(scheme, b, s, dev, backend, norm_backend)
            torch.cuda.empty_cache() if dev == "cuda" else None
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
                torch=torch.__version__, triton=__import__("triton").__version__, shapes=s,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
                seconds=round(time.time() - t0, 1))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_block.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta}\n{fmt(rows)}")
    for r in rows if dev == "cuda" else ():
        if r["part"] == "block, no attention" and r.get("fused_ms"):
            print(f"{r['group']}: x40 blocks {40 * (r['unfused_ms'] - r['fused_ms']):.1f} ms saved per forward")


if __name__ == "__main__":
    main()
