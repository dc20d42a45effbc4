"""Where a full-size DiT forward spends its GPU time: torch.profiler over resident forwards.

    python3 tools/trace_forward.py --out $OUT [--scheme int8] [--gemm triton] [--attention sdpa] [--batch 4]

Random weights at full size (tools/bench.py's random_model), all 40 blocks resident, KV window
full (4 blocks of 3168 tokens written before timing, as in steady state), 704x384; `--batch B` runs B samples
in one call over B step caches, as the batched profiles call it (times are then per call). Warms up, then
profiles `--forwards` forwards and prints the CUDA kernels grouped by kind (GEMM, attention,
quantization, elementwise, copies, ...) and the top kernels by total time; writes trace_forward.json
(and a Chrome trace with --chrome) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FULL, QUICK, random_model, synthetic_inputs  # noqa: E402

from lowvram.model.attention import LIBRARIES  # noqa: E402
from lowvram.model.config import DiTConfig  # noqa: E402

KINDS = [  # (kind, substrings of a kernel name, lowercase), first match wins
    ("attention", ("attn", "flash", "fmha", "cudnn", "sdpa", "softmax")),
    ("gemm", ("gemm", "_w8a8", "int8_mm", "fp8_mm", "matmul", "cutlass", "sm90_xmma", "nvjet", "wgmma")),
    ("quantize", ("quant",)),
    ("copy", ("memcpy", "memset", "copy_")),
    ("norm", ("norm",)),
    ("rope", ("rope",)),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise/other"


def union_ms(intervals) -> float:
    """Length of the union of (start, end) intervals (any unit; ms in, ms out): how long at least one ran."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def copy_direction(name: str) -> str | None:
    """"h2d" / "d2h" for a host<->device memcpy event's name (the copy engines' work), else None."""
    low = name.lower()
    if "memcpy" in low and "htod" in low:
        return "h2d"
    if "memcpy" in low and "dtoh" in low:
        return "d2h"
    return None


def gpu_summary(prof, n: int) -> dict:
    """A profiled span of n calls on the GPU (torch.profiler, CUDA activity): kernel ms per call by kind, the
    host<->device copies' ms per call by direction, and the span's wall on the GPU against the time at least one
    kernel ran (the union over streams: a streamed profile's dequantization on its copy stream overlaps the DiT's
    kernels), so that `idle` is the time per call the SMs had nothing to do (waiting on PCIe or the host)."""
    kinds, copies, spans = defaultdict(float), defaultdict(float), []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        a, b = e.time_range.start / 1e3, e.time_range.end / 1e3
        d = copy_direction(e.name)
        if d is not None:
            copies[d] += (b - a) / n
            continue
        kinds[kind_of(e.name)] += (b - a) / n
        spans.append((a, b))
    if not spans:
        return dict(calls=n, kinds={}, copies=dict(copies), span_ms=0.0, busy_ms=0.0, idle_ms=0.0)
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) / n
    busy = union_ms(spans) / n
    return dict(calls=n, kinds=dict(kinds), copies=dict(copies), span_ms=span, busy_ms=busy, idle_ms=span - busy)


def mean_summary(summaries: list[dict]) -> dict:
    """gpu_summary's of several spans averaged (per call, each kind and copy direction)."""
    n = len(summaries)
    out = dict(calls=sum(x["calls"] for x in summaries), kinds=defaultdict(float), copies=defaultdict(float))
    for x in summaries:
        for key in ("kinds", "copies"):
            for k, v in x[key].items():
                out[key][k] += v / n
    for key in ("span_ms", "busy_ms", "idle_ms"):
        out[key] = sum(x[key] for x in summaries) / n
    out["kinds"], out["copies"] = dict(out["kinds"]), dict(out["copies"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--scheme", default="int8", choices=["int8", "fp8", "bf16"])
    ap.add_argument("--gemm", default="auto")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "triton", *LIBRARIES],
                    help="sage / fa4: the optional libraries, where installed")
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, choices=[1, 2, 3, 4],
                    help="samples per call, each with its own step cache (the batched profiles' call)")
    ap.add_argument("--quick", action="store_true", help="scaled-down model on the CPU (a dry run of the code)")
    ap.add_argument("--chrome", action="store_true", help="also write a Chrome trace (large)")
    ap.add_argument("--fuse", default="quant", choices=["quant", "all", "off"],
                    help="quant: shared 8-bit inputs written by the norms (the default); all: and the FFN's GELU in "
                         "ffn.0's epilogue; off: every layer quantizes its own input (lowvram.quantize.fuse)")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.quick else "cuda")
    cfg = DiTConfig.from_dict(QUICK if args.quick else FULL)
    h, w = (16, 16) if args.quick else (48, 88)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from lowvram.runtime.engine import Engine
    from lowvram.runtime.planner import make_plan
    from lowvram.runtime.profile import Profile

    model = random_model(cfg, args.scheme, device, device)
    from lowvram.model.layers import set_fuse
    from lowvram.quantize import fuse

    set_fuse(model, args.fuse != "off")
    fuse.GELU_EPILOGUE = args.fuse == "all"
    # everything resident, the GPU step caches in bf16: the engine applies the backends to this model only
    plan = make_plan(Profile.resident(args.scheme, 1024.0, gemm=args.gemm, attention=args.attention), cfg,
                     w * 8, h * 8)
    engine = Engine.build(model, plan, device)
    ctx, ref, motion, audio = synthetic_inputs(cfg, h, w, device)
    g = torch.Generator(device="cpu").manual_seed(5)
    nb = args.batch
    x = torch.randn(nb, 16, 3, h, w, generator=g).to(device, torch.bfloat16)
    with torch.no_grad():
        engine.start(ctx, ref, motion, 4, 420)
        c, sink = engine.context, engine.sink
        kv = engine.kv[0] if nb == 1 else engine.kv[:nb]
        t = torch.full((nb, 3), 1000.0, device=device)
        # the audio copied once: a pageable copy per forward would synchronise it with the GPU
        a = audio[..., :12].to(device).expand(nb, *audio.shape[1:-1], 12).contiguous()

        def forward(block):
            return model(x, t, c, a, kv, sink, 3 * block, 10)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        for b in range(5):  # fill the window (and warm up: autotuning, cuDNN plans)
            forward(b)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.forwards):
            forward(4)
        launched = (time.perf_counter() - t0) / args.forwards  # the host's time to enqueue a forward
        sync()
        wall = (time.perf_counter() - t0) / args.forwards
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.forwards):
                forward(4)
            sync()
    if args.chrome:
        prof.export_chrome_trace(str(out / "trace_forward.chrome.json"))
    events = prof.key_averages()
    per_kernel = []
    for e in events:
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if device.type != "cuda":
            us = e.self_cpu_time_total
        if us > 0 and (device.type != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA):
            per_kernel.append((e.key, us / 1e3 / args.forwards, e.count // args.forwards))
    per_kernel.sort(key=lambda r: -r[1])
    kinds = defaultdict(float)
    for name, ms, _ in per_kernel:
        kinds[kind_of(name)] += ms
    busy = sum(kinds.values())
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
               scheme=args.scheme, batch=nb, gemm=args.gemm, attention=args.attention, fuse=args.fuse, wall_ms_per_forward=wall * 1e3,
               host_enqueue_ms_per_forward=launched * 1e3,
               kernel_ms_per_forward=busy, kinds=dict(kinds),
               kernels=[dict(name=n, ms=ms, calls=c) for n, ms, c in per_kernel[:60]])
    # the host's side: where a forward whose wall time exceeds its kernels' spends its CPU time
    cpu = sorted(((e.key, e.self_cpu_time_total / 1e3 / args.forwards, e.count // args.forwards) for e in events
                  if e.device_type == torch.autograd.DeviceType.CPU), key=lambda r: -r[1])
    res["cpu_ops"] = [dict(name=n, ms=ms, calls=c) for n, ms, c in cpu[:40]]
    (out / "trace_forward.json").write_text(json.dumps(res, indent=1))
    print(f"\ntop kernels per call of {nb} ({args.scheme}, gemm={args.gemm}, attention={args.attention}, fuse={args.fuse}):")
    for name, ms, calls in per_kernel[:25]:
        print(f"  {ms:8.2f} ms {calls:5d}x  {kind_of(name):18s} {name[:90]}")
    print(f"\ntop CPU ops per forward (self time; the profiler's own overhead included):")
    for name, ms, calls in cpu[:12]:
        print(f"  {ms:8.2f} ms {calls:5d}x  {name[:100]}")
    print(f"\nwall {wall * 1e3:.1f} ms per forward ({args.forwards} forwards, unprofiled; the host enqueued one in "
          f"{launched * 1e3:.1f} ms); kernels busy {busy:.1f} ms:")
    for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:18s} {ms:8.2f} ms  {100 * ms / busy:5.1f}%")


if __name__ == "__main__":
    main()
