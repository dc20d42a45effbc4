"""Time the VAE decode of one 12-frame block (3 latent frames at 704x384) in every variant, in one run.

    python3 tools/bench_vae.py           # GPU: real-size decoder (dim 96, z 16), random bf16 weights (~2 min, H200)
    python3 tools/bench_vae.py --quick   # CPU dry run of the whole script: tiny decoder, 64x48, Triton's interpreter

Steady state of streaming, as in the engine: each decoder is warmed with 7 latents (the motion
latents) and 2 blocks, then `--blocks` blocks of 3 latents are timed one by one (CUDA events; the
CPU time of the call is the launch cost a side stream must hide). Every variant decodes the same
latents, and its frames are checked against the exact path (`base`): max |diff|, SQNR, bit-equal.
Memory: `reserved` = the most the allocator held beyond the weights for this decoder (time cache,
step activations, CUDA-graph pools, workspaces): what the DiT loses; `step` = the step's peak
activations above the carried state. Then `--vae tiny` (TAEHV, random weights), the fused norm kernel
alone, a block's decode overlapped with a GEMM-only stand-in for the DiT (the worst case for overlap),
and a kernel-time breakdown of two variants. Prints a table last; writes bench_vae.json under --out
(default $OUT or the working directory).
"""

from __future__ import annotations

import os
import sys

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused norm on the CPU

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

from lowvram.io.video_writer import to_uint8  # noqa: E402
from lowvram.kernels.vae_norm import cuda_ms  # noqa: E402
from lowvram.model.taehv import TAEHVDecoder, TinyStreamingDecoder  # noqa: E402
from lowvram.model.vae import DecodeOptions, StreamingDecoder, VAEConfig, WanVAE  # noqa: E402
from lowvram.runtime.decode import GraphedDecoder, OverlappedDecoder  # noqa: E402

GIB = 1024 ** 3
CL, FN, G3, SP = dict(channels_last=True), dict(fused_norm=True), dict(group=3), dict(subpixel=True)
# name -> (decoder class, options); "tiny*" are TAEHV; "/exact": the fused norm with its IEEE divisions
# (kernels/vae_norm.FAST off) instead of the default fast arithmetic; "/plainhist": the causal convs' time
# history unpadded (vae_blocks.PADDED_HISTORY off)
VARIANTS = {
    "base": (StreamingDecoder, {}),
    "cudnn_benchmark": (StreamingDecoder, dict(cudnn_benchmark=True)),
    "channels_last": (StreamingDecoder, CL),
    "fused_norm": (StreamingDecoder, FN),
    "group3": (StreamingDecoder, G3),
    "graphs": (GraphedDecoder, {}),
    "split_time+cl": (StreamingDecoder, dict(CL, split_time=True)),
    "cl+fused": (StreamingDecoder, dict(CL, **FN)),
    "cl+fused+graphs": (GraphedDecoder, dict(CL, **FN)),
    "cl+fused+group3": (StreamingDecoder, dict(CL, **FN, **G3)),
    "all": (GraphedDecoder, dict(CL, **FN, **G3)),
    "all+cudnn_benchmark": (GraphedDecoder, dict(CL, **FN, **G3, cudnn_benchmark=True)),
    "all+split_time": (GraphedDecoder, dict(CL, **FN, **G3, split_time=True)),
    "cl+fused+graphs/exact": (GraphedDecoder, dict(CL, **FN)),
    "cl+fused+subpixel": (StreamingDecoder, dict(CL, **FN, **SP)),  # vae_decode "lean"
    "cl+fused+graphs+subpixel": (GraphedDecoder, dict(CL, **FN, **SP)),
    "all+subpixel": (GraphedDecoder, dict(CL, **FN, **G3, **SP)),
    "cl+fused+graphs+subpixel+out128": (GraphedDecoder, dict(CL, **FN, **SP, out_align=128)),
    "cl+fused+graphs+subpixel+out128/plainhist": (GraphedDecoder, dict(CL, **FN, **SP, out_align=128)),
    "all+subpixel+out128": (GraphedDecoder, dict(CL, **FN, **G3, **SP, out_align=128)),
    "all+split_time+subpixel": (GraphedDecoder, dict(CL, **FN, **G3, **SP, split_time=True)),
    "tiny": (TinyStreamingDecoder, dict(group=1)),
    "tiny_group3": (TinyStreamingDecoder, dict(group=3)),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_vae(cfg: VAEConfig, dev, dtype, seed=0) -> WanVAE:
    """A WanVAE with lowvram.demo.components.write_tiny_vae's initialisation, built on the device."""
    with torch.device(dev):
        vae = WanVAE(cfg)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device=dev))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g, device=dev))
            else:
                gain = 0.3 if name.startswith("decoder.head") or name.endswith("proj.weight") else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g, device=dev) / math.sqrt(math.prod(p.shape[1:])))
    return vae.to(dtype).eval().requires_grad_(False)


def random_taehv(dev, dtype, seed=0) -> TAEHVDecoder:
    """TAEHV with lowvram.demo.components.write_tiny_taehv's initialisation."""
    with torch.device(dev):
        tae = TAEHVDecoder()
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in tae.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.full_like(p, 0.5) if name == "decoder.22.bias"
                        else 0.02 * torch.randn(p.shape, generator=g, device=dev))
            else:
                gain = 0.5 if name.endswith("conv.4.weight") else 0.3 if name == "decoder.22.weight" else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g, device=dev) / math.sqrt(math.prod(p.shape[1:])))
    return tae.to(dtype).eval().requires_grad_(False)


def make(name, vae, tae):
    cls, kw = VARIANTS[name]
    if cls is TinyStreamingDecoder:
        return cls(tae, **kw)
    return cls(vae, DecodeOptions(**kw))


def compare(out, ref) -> dict:
    d = (out.float() - ref.float())
    err = d.square().sum().item()
    sqnr = math.inf if err == 0 else 10 * math.log10(ref.float().square().sum().item() / err)
    return dict(max_abs=d.abs().max().item(), sqnr_db=sqnr, bit_equal=bool(torch.equal(out, ref)))


def norm_arithmetic(name):
    """Context: kernels/vae_norm.FAST and vae_blocks.PADDED_HISTORY as the variant's name says ("/exact": the
    norm's IEEE divisions, "/plainhist": the time caches' unpadded history)."""
    import contextlib

    from lowvram.kernels import vae_norm
    from lowvram.model import vae_blocks

    @contextlib.contextmanager
    def cm():
        old = vae_norm.FAST, vae_blocks.PADDED_HISTORY
        vae_norm.FAST, vae_blocks.PADDED_HISTORY = "/exact" not in name, "/plainhist" not in name
        try:
            yield
        finally:
            vae_norm.FAST, vae_blocks.PADDED_HISTORY = old
    return cm()


def run_variant(name, vae, tae, warm, blocks, n_warm, dev, ref=None) -> tuple[dict, list]:
    """Decode warm + blocks with a fresh decoder (the norm's arithmetic as its name says)."""
    with norm_arithmetic(name):
        return _run_variant(name, vae, tae, warm, blocks, n_warm, dev, ref)


def _run_variant(name, vae, tae, warm, blocks, n_warm, dev, ref=None) -> tuple[dict, list]:
    """Decode warm + blocks with a fresh decoder; time the blocks after the first n_warm."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        reserved0 = torch.cuda.memory_reserved(dev)
    dec = make(name, vae, tae)
    t0 = time.perf_counter()
    dec.decode(warm)
    for b in blocks[:n_warm]:
        dec.decode(b)
    sync(dev)
    warm_s = time.perf_counter() - t0
    state = sum(t.numel() * t.element_size() for t in dec.state_tensors())
    if dev.type == "cuda":
        reserved_warm = torch.cuda.max_memory_reserved(dev)  # read before the reset clears it
        alloc0 = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    gpu_ms, cpu_ms, outs = [], [], []
    for b in blocks[n_warm:]:
        if dev.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t = time.perf_counter()
        out = dec.decode(b)
        cpu_ms.append((time.perf_counter() - t) * 1e3)
        if dev.type == "cuda":
            e1.record()
            e1.synchronize()
            gpu_ms.append(e0.elapsed_time(e1))
        else:
            gpu_ms.append(cpu_ms[-1])
        outs.append(out)
    row = dict(variant=name, ms=statistics.median(gpu_ms), ms_min=min(gpu_ms), cpu_ms=statistics.median(cpu_ms),
               warm_s=round(warm_s, 2), state_gib=state / GIB, frames=list(outs[0].shape))
    if dev.type == "cuda":
        row["step_gib"] = (torch.cuda.max_memory_allocated(dev) - alloc0) / GIB
        row["reserved_gib"] = (max(reserved_warm, torch.cuda.max_memory_reserved(dev)) - reserved0) / GIB
    if isinstance(dec, GraphedDecoder):
        row["graphs"] = len(dec.graphs)
    if ref is not None:
        checks = [compare(o, r) for o, r in zip(outs, ref)]
        row.update(max_abs=max(c["max_abs"] for c in checks), sqnr_db=min(c["sqnr_db"] for c in checks),
                   bit_equal=all(c["bit_equal"] for c in checks))
    del dec
    return row, outs


def fake_dit(dev, target_ms):
    """A GEMM-only stand-in for one DiT forward (M 3168, K 5120, N 13824 bf16; small on the CPU), ~target_ms long."""
    m, k, n = (3168, 5120, 13824) if dev.type == "cuda" else (64, 128, 256)
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(k, n, device=dev, dtype=torch.bfloat16) / k ** 0.5
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    torch.mm(a, w, out=out)
    sync(dev)
    t = time.perf_counter()
    for _ in range(10):
        torch.mm(a, w, out=out)
    sync(dev)
    n = max(1, int(target_ms / ((time.perf_counter() - t) * 100)))

    def block():
        for _ in range(n):
            torch.mm(a, w, out=out)
    return block


def bench_overlap(name, vae, tae, warm, blocks, dev, dit_ms) -> dict:
    """Wall time of len(blocks) x (DiT block, decode): alone, one after the other, and overlapped."""
    dit = fake_dit(dev, dit_ms)
    dec = make(name, vae, tae)
    dec.decode(warm)
    dec.decode(blocks[0])
    dit()
    sync(dev)
    t = time.perf_counter()
    for _ in blocks:
        dit()
    sync(dev)
    alone = time.perf_counter() - t
    t = time.perf_counter()
    for b in blocks:
        dit()
        to_uint8(dec.decode(b)).cpu()
    sync(dev)
    serial = time.perf_counter() - t
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        alloc0 = torch.cuda.memory_allocated(dev)
    ov = OverlappedDecoder(dec, to_uint8=True)
    t = time.perf_counter()
    for b in blocks:
        dit()
        ov.submit(b)
        ov.ready()
    ov.drain()
    overlapped = time.perf_counter() - t
    # hidden: the share of the decode's serial cost that overlapping removed (1: all of it)
    row = dict(variant=name, blocks=len(blocks), dit_s=alone, serial_s=serial, overlapped_s=overlapped,
               hidden=(serial - overlapped) / (serial - alone) if serial - alone > 0.01 * serial else None)
    if dev.type == "cuda":
        row["overlap_extra_gib"] = (torch.cuda.max_memory_allocated(dev) - alloc0) / GIB
    return row


def profile_breakdown(name, vae, tae, warm, block, dev) -> dict:
    """GPU kernel time of one block by kind, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with norm_arithmetic(name):
        return _profile_breakdown(name, vae, tae, warm, block, dev, profile, ProfilerActivity)


def _profile_breakdown(name, vae, tae, warm, block, dev, profile, ProfilerActivity) -> dict:
    dec = make(name, vae, tae)
    dec.decode(warm)
    dec.decode(block)
    dec.decode(block)
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.decode(block)
        sync(dev)
    kinds = {"conv": ("conv", "xmma", "cudnn", "implicit", "gemm", "sm90", "cutlass", "nhwc", "ndhwc"),
             "norm": ("norm", "reduce", "silu", "sigmoid"), "attention": ("fmha", "flash", "attention", "softmax"),
             "upsample": ("upsample", "interp"), "copy/fill": ("copy", "fill", "cat", "memcpy", "memset"),
             "elementwise": ("elementwise", "vectorized", "add", "mul", "clamp")}
    by_kind, top = {}, []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us <= 0:
            continue
        kind = next((k for k, keys in kinds.items() if any(s in ev.key.lower() for s in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0) + us / 1e3
        top.append((us / 1e3, ev.count, ev.key[:140]))
    top.sort(reverse=True)
    ops = []
    cls, kw = VARIANTS[name]
    if cls is not TinyStreamingDecoder:  # the same options without graphs: which torch op (and shape) costs what
        dec = StreamingDecoder(vae, DecodeOptions(**kw))
        dec.decode(warm)
        dec.decode(block)
        sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            dec.decode(block)
            sync(dev)
        for ev in prof.key_averages(group_by_input_shape=True):
            us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            if us > 0 and ev.key.startswith("aten::"):
                ops.append((round(us / 1e3, 2), ev.count, ev.key, str(ev.input_shapes)[:120]))
        ops.sort(reverse=True)
    return dict(variant=name, ms_by_kind={k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                top=[dict(ms=round(ms, 2), calls=c, kernel=k) for ms, c, k in top[:25]],
                ops=[dict(ms=ms, calls=c, op=k, shapes=sh) for ms, c, k, sh in ops[:30]])


def bench_convs(h, w, frames=4, iters=10) -> dict:
    """One 3x3x3 causal conv of the decoder at each stage's width (its padded input of frames + 2 slices, bf16,
    channels-last), in several formulations: ms and TFLOP/s of each (cuDNN picks a kernel per shape)."""
    import torch.nn.functional as F

    res = {}
    for c, d in ((96, 1), (192, 2), (384, 4)):
        hh, ww = h // d, w // d
        x = torch.randn(1, c, frames + 2, hh + 2, ww + 2, device="cuda", dtype=torch.bfloat16)
        xcl = x.contiguous(memory_format=torch.channels_last_3d)
        wt = torch.randn(c, c, 3, 3, 3, device="cuda", dtype=torch.bfloat16) / math.sqrt(27 * c)
        flop = 2 * frames * hh * ww * c * c * 27
        pad = -c % 128 or 0
        w128 = torch.cat([wt, wt.new_zeros(pad, c, 3, 3, 3)]) if pad else wt
        w2 = [wt[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
        wst = wt.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3).contiguous(memory_format=torch.channels_last)

        def split():
            out = None
            for k in range(3):
                fr = xcl[:, :, k:k + frames].transpose(1, 2).reshape(frames, c, hh + 2, ww + 2)
                y = F.conv2d(fr, w2[k])
                out = y if out is None else out.add_(y)
            return out

        def stacked():  # the 3 input slices of each output frame as 3C channels of one 2-D image
            st = torch.cat([xcl[:, :, k:k + frames] for k in range(3)], dim=1)  # [1, 3C, T, H, W]
            st = st.transpose(1, 2).reshape(frames, 3 * c, hh + 2, ww + 2).contiguous(memory_format=torch.channels_last)
            return F.conv2d(st, wst)

        fns = {"conv3d_cl": lambda: F.conv3d(xcl, wt.contiguous(memory_format=torch.channels_last_3d)),
               "conv3d_ncdhw": lambda: F.conv3d(x, wt),
               "split_time_2d": split, "time_stacked_2d": stacked}
        if pad:
            w128cl = w128.contiguous(memory_format=torch.channels_last_3d)
            fns[f"conv3d_cl_out{c + pad}"] = lambda: F.conv3d(xcl, w128cl)
        row = {}
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            for name, fn in fns.items():
                try:
                    ms = cuda_ms(fn, iters, warmup=2)
                    row[name + ("+bench" if bench else "")] = {"ms": round(ms, 3), "TFLOP/s": round(flop / ms / 1e9)}
                except Exception as e:  # noqa: BLE001 - a formulation cuDNN refuses is reported
                    row[name + ("+bench" if bench else "")] = f"failed: {str(e).splitlines()[0][:100]}"
        torch.backends.cudnn.benchmark = False
        res[f"{c}x{hh}x{ww}x{frames}"] = row
    return res


def fmt_table(rows, base_ms) -> str:
    head = (f"{'variant':22s} {'ms/block':>9s} {'min':>7s} {'cpu ms':>7s} {'speed-up':>8s} {'max|d|':>8s} "
            f"{'SQNR dB':>8s} {'bits':>5s} {'reserved':>9s} {'step':>6s} {'state':>6s}")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:22s} FAILED: {r['error']}")
            continue
        sq = r.get("sqnr_db")
        sq = "-" if sq is None else "inf" if sq == math.inf else f"{sq:.1f}"
        bits = "-" if "bit_equal" not in r else "same" if r["bit_equal"] else "diff"
        mem = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        lines.append(f"{r['variant']:22s} {r['ms']:9.1f} {r['ms_min']:7.1f} {r['cpu_ms']:7.1f} "
                     f"{base_ms / r['ms']:8.2f} {r.get('max_abs', 0):8.4f} {sq:>8s} {bits:>5s} "
                     f"{mem('reserved_gib'):>9s} {mem('step_gib'):>6s} {r['state_gib']:6.2f}")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU dry run: tiny decoder (dim 8), 64x48, fp32")
    ap.add_argument("--size", default="704*384", help="W*H of the frames (multiples of 8)")
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks per variant (after 2 warm-up blocks)")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run these variants (base always runs)")
    ap.add_argument("--dit-ms", type=float, default=250.0, help="length of the stand-in DiT block in the overlap run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_vae.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["norm_kernel", "convs", "overlap", "profile"],
                    help="leave out these measurements after the variants")
    ap.add_argument("--profile", nargs="*", choices=list(VARIANTS),
                    help="variants whose kernels are broken down (default: base and the fastest)")
    a = ap.parse_args()
    t_start = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    if a.quick:
        torch.set_num_threads(1)  # tiny convs: thread hand-offs cost more than the work (tests/test_vae.py)
    w, h = (64, 48) if a.quick else map(int, a.size.split("*"))
    cfg = VAEConfig(dim=8) if a.quick else VAEConfig()
    dtype = torch.float32 if a.quick else torch.bfloat16
    n_timed, n_warm = (2, 1) if a.quick else (a.blocks, 2)
    vae, tae = random_vae(cfg, dev, dtype), random_taehv(dev, dtype)
    g = torch.Generator(device=dev).manual_seed(1)
    warm = torch.randn(1, 16, 7, h // 8, w // 8, generator=g, device=dev, dtype=dtype)
    blocks = [torch.randn(1, 16, 3, h // 8, w // 8, generator=g, device=dev, dtype=dtype)
              for _ in range(n_warm + n_timed)]
    names = ["base"] + [n for n in VARIANTS if n != "base" and (a.only is None or n in a.only)]
    if a.quick:
        names = [n for n in names if n not in ("all+cudnn_benchmark",)]
    rows, ref = [], None
    for name in names:
        try:
            row, outs = run_variant(name, vae, tae, warm, blocks, n_warm, dev,
                                    None if name.startswith("tiny") else ref)
            if name == "base":
                ref = outs
            rows.append(row)
            print(f"{name}: {row['ms']:.1f} ms/block, {row.get('sqnr_db', '-')} dB", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant is reported; the others still run
            traceback.print_exc()
            rows.append(dict(variant=name, error=(str(e).strip().splitlines() or [type(e).__name__])[0][:160]))
    extra = {}
    timed = [r for r in rows if "error" not in r and not r["variant"].startswith("tiny")]
    best = min(timed, key=lambda r: r["ms"])["variant"] if timed else "base"
    for key, fn in (
            ("norm_kernel", lambda: {  # the decoder's widths at their resolutions (4 frames each)
                f"{c}x{h // d}x{w // d}": __import__("lowvram.kernels.vae_norm", fromlist=["x"]).bench_norm_silu(
                    (1, c, 4, h // d, w // d)) for c, d in ((96, 1), (192, 2), (384, 4))}
             if dev.type == "cuda" else "cuda only"),
            ("convs", lambda: bench_convs(h, w) if dev.type == "cuda" else "cuda only"),
            ("overlap", lambda: [bench_overlap(n, vae, tae, warm, blocks[:3], dev, a.dit_ms)
                                 for n in dict.fromkeys(["base", best, "tiny"])]),
            ("profile", lambda: [profile_breakdown(n, vae, tae, warm, blocks[0], dev)
                                 for n in (a.profile or dict.fromkeys(["base", best]))]
             if dev.type == "cuda" else "cuda only")):
        if key in a.skip:
            continue
        try:
            extra[key] = fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            extra[key] = f"failed: {(str(e).strip().splitlines() or [type(e).__name__])[0][:160]}"
        print(f"\n{key}: {json.dumps(extra[key], indent=1)}", flush=True)
    meta = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (quick)",
                torch=torch.__version__, triton=__import__("triton").__version__,
                cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None, commit=git_commit(),
                size=f"{w}x{h}", dim=cfg.dim, dtype=str(dtype), timed_blocks=n_timed, best=best,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
                seconds=round(time.time() - t_start, 1))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_vae.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, **extra), f, indent=1, default=str)
    print(f"\n{meta}")
    base = next((r for r in rows if r["variant"] == "base" and "error" not in r), None)
    print(fmt_table(rows, base["ms"] if base else float("nan")))


if __name__ == "__main__":
    main()
