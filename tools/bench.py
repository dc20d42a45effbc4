"""Full-size benchmark of lowvram on one GPU: random weights built in memory (no 32 GB file).

    python tools/bench.py --out $OUT                 # on the GPU: accuracy + every profile
    python tools/bench.py --quick --device cpu       # a scaled-down dry run of the same code
    python tools/bench.py --out $OUT --skip-accuracy --no-resident --profiles 4090,16gb,12gb \
        --schedules sequential,batched --tpp --clips 2   # issue 11: batched vs sequential, one TPP rank
    python tools/bench.py --out $OUT --skip-accuracy --no-resident --profiles 4090 \
        --set attention=triton8 --variant attention=sdpa --clips 2   # issue 15: host kv8 + 8-bit kernel vs sdpa
    python tools/bench.py --out $OUT --skip-accuracy --no-resident --profiles h100-80 --clips 3 \
        --set cuda_graphs=off --variant cuda_graphs=on   # issue 15: the steady calls as CUDA graphs (9 full ticks)

Part 1, accuracy: SQNR of whole DiT forwards at 704x384 (int8 and fp8 W8A8 against bf16, same
random weights, same inputs). Part 2, memory and speed: for each profile under its allocator cap, at least
2 clips after a warm-up clip with the real schedule: peak VRAM (allocator reserved and NVML),
seconds per clip, generated FPS, DiT and VAE time, PCIe bytes per forward, copy-stream busy time,
the plan's expected peak, and a projection onto a 4090 (23 GB/s PCIe, compute scaled by peak
throughput ratio), labelled as such. The runs walk the timestep-forcing ticks as the session does
(`--schedules sequential,batched` runs each profile both ways: a batched tick is one DiT call), and
`--tpp` measures one rank of the multi-GPU pipeline and projects 4- and 5-GPU throughput from it.
Runs of one weight scheme share one random model. Prints a table last and writes JSON under --out.
A profile's attention "auto" resolves by this GPU as `lowvram run` would (sdpa on an H200, triton8 on
sm_86/sm_89): set attention= to measure another backend. Issue 15's run (the last command above, in the
profile's batched schedule; again with --set schedule=sequential for one forward per call) measures, for kv8
host caches read by the 8-bit kernel against int8 host caches dequantized for SDPA, on the same H200 under the
4090's 24 GiB cap: DiT s/clip, copy-stream busy fraction (kv8 relays V on the copy stream instead of
dequantizing K and V), PCIe bytes per forward (the same KV bytes: the plans' 5.25 vs 5.42 GB batched, 6.13 vs
6.48 sequential, differ only by the streamed blocks), and NVML peak against the plan (kv8's working windows:
0.70 instead of 1.55 GiB batched, 0.33 instead of 0.82 sequential). On an H200 the 8-bit kernel is slower than
cuDNN (0.55x, BENCHMARKS.md section 3), so its FPS there says nothing of a 4090's; that is a projection.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lowvram.constants import GIB
from lowvram.metrics import sqnr_db
from lowvram.model.config import DiTConfig
from lowvram.model.dit import build_model
from lowvram.quantize.linear import QuantLinear, apply_quant_layers, quantize_weight
from lowvram.quantize.select import quantized_module

FULL = dict(dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40, num_layers=40)
QUICK = dict(dim=256, ffn_dim=512, freq_dim=64, num_heads=2, num_layers=4, text_dim=64, audio_dim=64,
             audio_inject_layers=[0, 3], num_audio_layers=3)
CAPS = {"h100-80": None, "4090": 24, "16gb": 16, "12gb": 12}


class NvmlPeak:
    """Polls nvidia-smi for this process's GPU memory (what NVML reports, context included)."""

    def __init__(self, interval=0.05):
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self.ok = subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0

    def _poll(self):
        pid = str(os.getpid())
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                p, _, mib = line.partition(",")
                if p.strip() == pid:
                    self.peak = max(self.peak, int(mib) * 2 ** 20)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.ok:
            self.t = threading.Thread(target=self._poll, daemon=True)
            self.t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()


def random_model(cfg: DiTConfig, scheme: str, device, out_device, seed=0):
    """The DiT with random weights (realistic scales), Linear layers quantized to `scheme` unless bf16.
    Tensors are generated on `device` and stored on `out_device` (the CPU for the profiles that place it)."""
    model = build_model(cfg, "meta")
    sd_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = {}
    if scheme != "bf16":
        names = {m: scheme for k, s in sd_shapes.items() if (m := quantized_module(k, s))}
        apply_quant_layers(model, names)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for k, v in model.state_dict(keep_vars=True).items():
        mod, _, leaf = k.rpartition(".")
        shape = tuple(v.shape)
        if mod in names and leaf == "qweight":
            w = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) * shape[1] ** -0.5
            q, s = quantize_weight(w, scheme)
            state[k], state[f"{mod}.scale"] = q.to(out_device), s.to(out_device)
            continue
        if mod in names and leaf == "scale":
            continue
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if k.endswith("weight") and len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            t = t * fan_in ** -0.5
        elif k.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            t = 1 + 0.05 * t
        else:
            t = t * 0.05
        state[k] = t.to(torch.bfloat16).to(out_device)
    model.load_state_dict(state, assign=True)
    return model.eval()


def quantize_copy(model, scheme):
    """QuantLinear copies of every quantizable Linear of a bf16 model (name -> module)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and quantized_module(name + ".weight", tuple(m.weight.shape)):
            out[name] = QuantLinear.from_linear(m, scheme)
    return out


def swap(model, modules: dict):
    old = {}
    for name, new in modules.items():
        parent, _, child = name.rpartition(".")
        p = model.get_submodule(parent)
        old[name] = getattr(p, child)
        setattr(p, child, new)
    return old


def synthetic_inputs(cfg, h, w, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ctx = torch.randn(40, cfg.text_dim, generator=g)
    ref = torch.randn(1, 16, 1, h, w, generator=g)
    motion = torch.randn(1, 16, 19, h, w, generator=g)
    audio = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 48 * 4, generator=g) * 0.5
    return ctx, ref, motion, audio


def accuracy(cfg, h, w, device, log):
    """SQNR of DiT forwards (sink + 2 blocks, 2 steps each) for int8 and fp8 against bf16 (all with sdpa; and with
    each optional library's attention that runs here, sage and fa4, against the same bf16 sdpa forwards)."""
    from lowvram.runtime.kv_cache import GpuKVCache

    model = random_model(cfg, "bf16", device, device)
    ctx, ref, motion, audio = synthetic_inputs(cfg, h, w, device)
    tokens = (h // 2) * (w // 2)
    g = torch.Generator(device="cpu").manual_seed(5)
    xs = [torch.randn(1, 16, 3, h, w, generator=g).to(device, torch.bfloat16) for _ in range(2)]

    def forwards(int8_sink=False):
        c = model.embed_text([ctx])
        sink = model.prefill_sink(ref.to(device, torch.bfloat16), motion.to(device, torch.bfloat16), c, int8=int8_sink)
        kv = GpuKVCache(cfg.num_layers, 12 * tokens, 1, cfg.num_heads, cfg.head_dim, torch.bfloat16, device)
        outs = []
        for b, x in enumerate(xs):
            for t in (1000.0, 857.6923):
                outs.append(model(x, torch.full((1, 3), t, device=device), c, audio[..., :12].to(device), kv, sink,
                                  3 * b, 10).float().cpu())
        del kv, sink
        return outs

    from lowvram.model.attention import LIBRARIES, library_module

    res = {}
    t0 = time.perf_counter()
    ref_out = forwards()
    res["bf16_forward_s"] = (time.perf_counter() - t0) / len(ref_out)
    # the optional libraries' attentions (sage, fa4) where they run here: the same forwards with each
    attentions = ("sdpa",) + tuple(a for a in LIBRARIES if library_module(a).unavailable(device) is None)

    def record(key, outs):
        res[key] = [round(sqnr_db(a, b), 2) for a, b in zip(ref_out, outs)]
        log(f"accuracy {key}: SQNR per forward {res[key]} dB")

    for att in attentions[1:]:
        model.attention = att
        record(f"bf16+{att}", forwards())
    for scheme in ("int8", "fp8"):
        if scheme == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            res[scheme] = "n/a: FP8 needs sm_89+"
            continue
        q = quantize_copy(model, scheme)
        old = swap(model, q)
        for att in attentions:
            model.attention = att
            record(scheme if att == "sdpa" else f"{scheme}+{att}", forwards())
            if scheme == "int8":  # the 24 GB profiles' INT8 sink
                record(f"{scheme}+int8 sink" if att == "sdpa" else f"{scheme}+int8 sink+{att}", forwards(int8_sink=True))
        model.attention = "sdpa"
        swap(model, old)
        del q
    del model
    gc.collect()
    return res


def _sync(device, everything: bool = False):
    """Wait for this stream's work (everything: every stream's, the decode's included) before reading the clock."""
    if device.type == "cuda":
        if everything:
            torch.cuda.synchronize(device)
        else:
            torch.cuda.current_stream(device).synchronize()


class SharedModel:
    """One random-weight model per scheme, reused by every run of that scheme (building 14B random weights
    is the slowest part of a run): a run's engine places it, `give_back` returns it to the CPU for the next."""

    def __init__(self, cfg, device):
        self.cfg, self.device, self.models = cfg, device, {}

    def get(self, scheme):
        if scheme not in self.models:
            self.models = {}  # one scheme in memory at a time
            gc.collect()
            self.models[scheme] = random_model(self.cfg, scheme, self.device, "cpu")
        return self.models[scheme]

    def give_back(self, engine):
        engine.release()  # streamed blocks point at their host slabs again, resident ones are on the GPU
        engine.model.to("cpu")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _cap(device, cap_gib):
    from lowvram.runtime.machine import Machine, apply_vram_cap

    if device.type == "cuda":
        torch.cuda.empty_cache()
        apply_vram_cap(device, cap_gib)  # the same allocator cap as `lowvram run --vram-cap-gib`
        torch.cuda.reset_peak_memory_stats(device)
    return Machine.detect(device, cap_gib).free_vram_bytes if cap_gib else None


def _gpu(device) -> dict:
    """make_plan's view of the GPU, as `lowvram run` measures it: the profiles' attention "auto" resolves by it
    (on this H200, sm_90: sdpa; --set attention=triton8 measures the 8-bit kernel with kv8 caches)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return dict(capability=cap, device_type=device.type)


def _overrides(scheme_override, overrides, device):
    ov = dict(overrides or {})
    if scheme_override:
        ov["quant"] = scheme_override
    if device.type != "cuda":
        ov["attention"] = "sdpa"  # the Triton kernels would run in the interpreter
    return ov


def profile_run(cfg, name, cap_gib, scheme_override, h, w, device, clips, log, vae=None, overrides=None,
                models=None, trace_ticks=0):
    """One profile: plan, build the engine on a random-weight model, then the session's tick loop
    (schedule.ticks) over 1 + `clips` clips: clip 0 is the warm-up (drained after it, as at the online-decode
    boundary), clips 1.. are timed. Segment FPS counts the timed clips' fill and drain ticks; steady FPS is
    one block per full tick (batched: 4 forwards in one call; sequential: 4 forwards), the median full tick (with
    CUDA graphs the first full ticks are the warm-up and the capture; `--clips 3` gives 9 full ticks).
    trace_ticks: torch.profiler over that many full ticks of the first timed clip (trace_forward.gpu_summary: kernel
    time by kind, PCIe copies, the SMs' idle time per tick); the profiler slows those ticks, so such a run's FPS is
    marked `traced` and is not a measurement of speed."""
    from lowvram.pipeline.encode import block_audio, clip_source
    from lowvram.runtime.engine import Engine
    from lowvram.runtime.planner import make_plan
    from lowvram.runtime.profile import Profile
    from lowvram.runtime.schedule import ticks

    prof = Profile.from_name(name, **_overrides(scheme_override, overrides, device))
    free = _cap(device, cap_gib)
    plan = make_plan(prof, cfg, w * 8, h * 8, free_vram_bytes=free, **_gpu(device))
    log(f"[{name} {plan.schedule}] {plan.headline()}")
    t0 = time.perf_counter()
    model = models.get(prof.quant) if models is not None else random_model(cfg, prof.quant, device, "cpu")
    engine = Engine.build(model, plan, device, vae=vae, log=log)
    build_s = time.perf_counter() - t0
    ctx, ref, motion, audio = synthetic_inputs(cfg, h, w, device)
    engine.start(ctx, ref, motion, 4, 420)
    feats = clip_source(audio)
    total, steps = 4 * (clips + 1), 4
    drain = range(1, total) if plan.batch <= 1 else [4]
    latents, full, nv, dit, dec, timed, finals = {}, [], None, 0.0, 0.0, False, {}
    queue = engine.decode_queue(to_uint8=True)  # on its own stream when plan.vae_overlap, as the session
    wall0, prof, traced = None, None, []  # traced: (wall s, trace_forward.gpu_summary) of each traced tick
    if trace_ticks:
        from trace_forward import gpu_summary, mean_summary
    for tick in ticks(total, steps, drain_before=drain):
        if not timed and min(4 * wk.idx.clip + wk.idx.block for wk in tick) >= 4:  # warm-up over
            queue.drain()
            _sync(device, everything=True)
            engine.reset_stats()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            nv, timed, wall0 = NvmlPeak().__enter__(), True, time.perf_counter()
        _sync(device)
        tracing = timed and len(tick) == steps and len(traced) < trace_ticks
        if tracing:  # a profiler of this tick alone (the ticks after it may be narrower, or the decode's)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
            prof.__enter__()
        t = time.perf_counter()
        xs = [latents.pop(wk.idx) if wk.step else engine.initial_latents(wk.idx) for wk in tick]
        outs = engine.run_works(tick, xs, [block_audio(feats, wk.idx) for wk in tick])
        _sync(device)
        dt = time.perf_counter() - t
        if tracing:
            prof.__exit__(None, None, None)
            traced.append((dt, gpu_summary(prof, 1)))
            prof = None
        if timed:
            dit += dt
            full.append((len(tick), dt))
        for wk, lat in zip(tick, outs):
            if wk.step < steps - 1:
                latents[wk.idx] = lat
                continue
            finals[(wk.idx.clip, wk.idx.block)] = lat.detach().float().cpu()  # compared across schedules
            t = time.perf_counter()
            queue.submit(lat.to(vae.dtype))
            queue.ready()
            if not plan.vae_overlap:
                _sync(device)  # a serial decode ran on this stream: its time is the decode's, not the next tick's
            dec += (time.perf_counter() - t) if timed else 0.0
    t = time.perf_counter()
    queue.drain()
    dec += time.perf_counter() - t
    _sync(device, everything=True)
    wall = time.perf_counter() - wall0
    nv.__exit__()
    stats = engine.stats()
    widest = max(n for n, _ in full)
    block_dit = statistics.median(dt * steps / n for n, dt in full if n == widest)
    dit, dec = dit / clips, dec / clips  # dec: the host's time in the decode calls (launch, or the whole decode
    per_clip = wall / clips  # when serial) and waiting for frames; per clip: the timed clips' wall time
    forwards = 16 * clips
    blk, kvs = stats.get("blocks", {}), stats.get("kv", {})
    h2d = blk.get("bytes_h2d", 0) + kvs.get("bytes_h2d", 0)
    busy = blk.get("copy_busy_s", 0.0) + kvs.get("copy_busy_s", 0.0)
    res = dict(profile=name, cap_gib=cap_gib, scheme=plan.quant, gemm=plan.gemm, attention=str(plan.attention),
               vae_overlap=plan.vae_overlap, cuda_graphs=plan.cuda_graphs, graphs=stats.get("graphs"),
               gpu_kv_sink=plan.gpu_kv_sink,
               attention_why=plan.attention_why, sink=plan.sink_dtype, schedule=plan.schedule, batch=plan.batch,
               resident=len(plan.resident), streamed=len(plan.streamed), kv=f"{plan.kv_caches[0]}/{plan.kv_format}",
               build_s=round(build_s, 1), s_per_clip=round(per_clip, 3), dit_s_per_clip=round(dit, 3),
               vae_s_per_clip=round(dec, 3), fps=round(48 / per_clip, 2),
               steady_fps=round(12 / (block_dit + dec / 4), 2), steady_dit_s_per_block=round(block_dit, 3),
               pcie_h2d_gb_per_forward=round(h2d / forwards / 1e9, 3),
               plan_pcie_gb_per_forward=round(plan.pcie_h2d_bytes / 1e9, 3),
               plan_pcie_gb_per_forward_sequential=round(plan.pcie_h2d_bytes_at(1) / 1e9, 3),
               copy_busy_fraction=round(busy / (dit * clips), 3) if dit else 0.0,
               expected_peak_gib=round(plan.generate_peak_bytes / GIB, 2),
               peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else 0,
               peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 2) if device.type == "cuda" else 0,
               peak_nvml_gib=round(nv.peak / GIB, 2), raw_stats=stats)
    if traced:
        wall_ms = 1e3 * sum(d for d, _ in traced) / len(traced)
        res["traced"] = tr = dict(mean_summary([g for _, g in traced]), wall_ms=wall_ms)
        log(f"[{name}] traced {len(traced)} full ticks: wall {tr['wall_ms']:.1f} ms, GPU span {tr['span_ms']:.1f}, "
            f"kernels busy {tr['busy_ms']:.1f}, SMs idle {tr['idle_ms']:.1f} ms per tick; "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(tr["kinds"].items(), key=lambda kv: -kv[1]))
            + "; copies " + ", ".join(f"{k} {v:.1f}" for k, v in tr["copies"].items())
            + " ms (FPS of this run: traced)")
    res["_finals"] = finals  # taken out by main for schedule_identity: not written to bench.json
    res["nvml_minus_plan_gib"] = round(res["peak_nvml_gib"] - res["expected_peak_gib"], 2) if nv.ok else None
    # projection onto a 4090 (labelled): PCIe traffic at 23 GB/s
    res["projected_4090_pcie_s_per_forward"] = round(h2d / forwards / 23e9, 3)
    if models is not None:
        models.give_back(engine)
    else:
        engine.release()
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if res["graphs"]:
        log(f"[{name}] CUDA graphs: {res['graphs']}")
    log(f"[{name} {plan.schedule}] {res['fps']} FPS ({res['steady_fps']} steady), {res['s_per_clip']} s/clip, "
        f"peak allocated {res['peak_allocated_gib']} reserved {res['peak_reserved_gib']} GiB, "
        f"NVML {res['peak_nvml_gib']} GiB, expected {res['expected_peak_gib']} GiB")
    return res


def with_index(device: torch.device) -> torch.device:
    """A CUDA device with its index (the current one where none is given): the allocator cap of a capped run needs
    it (torch.cuda.set_per_process_memory_fraction); other devices as they are."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def guarded_run(label, cfg, name, cap_gib, h, w, device, clips, log, **kw) -> tuple[dict, dict | None]:
    """profile_run (its other arguments in kw) labelled `label`, whose failure becomes a row with the error (logged
    with its traceback) so that the other runs' numbers survive: -> (the row, its final latents or None)."""
    try:
        r = profile_run(cfg, name, cap_gib, None, h, w, device, clips, log, **kw)
    except Exception as e:  # one profile failing must not lose the others' numbers
        r = {"profile": name, "error": f"{type(e).__name__}: {e}"[:500]}
        log(f"[{label}] failed: {r['error']}")
        import traceback
        log(traceback.format_exc()[-1500:])
    gc.collect()  # a failed run's model and caches must not stay on the GPU for the next profile
    if device.type == "cuda":
        torch.cuda.empty_cache()
    r["label"] = label
    return r, r.pop("_finals", None)


TPP_STEP = 2  # the rank measured: it owns denoising step 2 and its step cache


TPP_VARIANTS = {  # a rank's step cache: on the GPU in the 8-bit kernel's format, or on the host in INT8
    "gpu-kv8": {"kv_placement": "gpu", "kv_dtype": "bf16", "attention": "triton8"},
    "host-int8": {},
}


def tpp_rank_run(cfg, h, w, device, log, vae=None, models=None, forwards=6, cap_gib=24, gpus=(4, 5),
                 variant="host-int8"):
    """One rank of the timestep-forcing pipeline (`--profile 4090 --gpus 4`): the whole quantized DiT and only
    its own step's cache, planned against a 24 GiB card (`variant`: its cache on the GPU in the 8-bit format,
    or on the host), one forward per block in steady state. Measures forward time and peaks, and from them
    PROJECTS the throughput of 4 ranks (one also decodes) and of 4 + 1 (a fifth GPU decodes)."""
    from lowvram.pipeline.encode import block_audio, clip_source
    from lowvram.runtime.engine import Engine
    from lowvram.runtime.planner import make_plan
    from lowvram.runtime.profile import Profile
    from lowvram.runtime.schedule import block_of

    free = _cap(device, cap_gib)
    ov = {**TPP_VARIANTS[variant], **_overrides(None, None, device)}
    plan = make_plan(Profile.from_name("4090", **ov), cfg, w * 8, h * 8, free_vram_bytes=free, steps=(TPP_STEP,),
                     **_gpu(device))
    log(f"[tpp rank {variant}] {plan.headline()}")
    model = models.get(plan.quant) if models is not None else random_model(cfg, plan.quant, device, "cpu")
    engine = Engine.build(model, plan, device, vae=vae, log=log)
    ctx, ref, motion, audio = synthetic_inputs(cfg, h, w, device)
    engine.start(ctx, ref, motion, 4, 420)
    feats = clip_source(audio)
    times, nv = [], None
    for g in range(2 + forwards):  # 2 warm-up forwards
        idx = block_of(g)
        if g == 2:
            _sync(device)
            engine.reset_stats()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            nv = NvmlPeak().__enter__()
        x = engine.initial_latents(idx)  # stands for step 1's output (the values do not change the time)
        _sync(device)
        t = time.perf_counter()
        lat = engine.step(idx, TPP_STEP, x, block_audio(feats, idx).to(device))
        _sync(device)
        if g >= 2:
            times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(2):
        engine.decode(lat)
    _sync(device)
    dec = (time.perf_counter() - t) / 2
    nv.__exit__()
    fwd = sorted(times)[len(times) // 2]
    res = dict(label=f"tpp rank {variant} (4090, --gpus 4)", variant=variant, profile="4090", cap_gib=cap_gib, steps=list(plan.steps),
               kv=f"{plan.kv_caches[0]}/{plan.kv_format}", attention=str(plan.attention),
               resident=len(plan.resident), streamed=len(plan.streamed), forward_s=round(fwd, 3),
               vae_s_per_block=round(dec, 3), plan_pcie_gb_per_forward=round(plan.pcie_h2d_bytes / 1e9, 3),
               expected_peak_gib=round(plan.generate_peak_bytes / GIB, 2),
               peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else 0,
               peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 2) if device.type == "cuda" else 0,
               peak_nvml_gib=round(nv.peak / GIB, 2), raw_stats=engine.stats())
    # PROJECTION, not a measurement: every rank runs one forward per block (12 frames) in steady state; with
    # 4 GPUs one DiT rank also decodes each block, with 5 a fifth GPU decodes beside the 4 DiT ranks;
    # transfers of block latents (~0.1 MB) are ignored
    if 4 in gpus:
        res["projected_fps_4_gpus"] = round(12 / (fwd + dec), 2)
    if 5 in gpus:
        res["projected_fps_5_gpus"] = round(12 / max(fwd, dec), 2)
    if models is not None:
        models.give_back(engine)
    else:
        engine.release()
    log(f"[tpp rank {variant}] forward {res['forward_s']} s, VAE {res['vae_s_per_block']} s/block, NVML {res['peak_nvml_gib']} "
        f"GiB (plan {res['expected_peak_gib']}); PROJECTED {res.get('projected_fps_4_gpus')} FPS on 4 GPUs, "
        f"{res.get('projected_fps_5_gpus')} on 5")
    return res


def schedule_identity(finals: dict) -> list[dict]:
    """finals: profile -> schedule -> the final latents of every block, from the `--schedules` runs only (a
    `--variant` run changes more than the schedule). For each profile run under both schedules: are they the
    same (same model, inputs and seed), and if not, how far apart (max |difference| and the relative L2 norm)."""
    out = []
    for name, got in finals.items():
        a, b = got.get("sequential"), got.get("batched")
        if not a or not b or a.keys() != b.keys():
            continue
        same = all(torch.equal(a[k], b[k]) for k in a)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        rel = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
        out.append({"profile": name, "blocks": len(a), "bit_identical": same, "max_abs_diff": diff,
                    "max_rel_l2": rel})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--quick", action="store_true", help="scaled-down model and size (a dry run of the code)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--profiles", default="h100-80,4090,16gb,12gb")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of every profile run, e.g. gemm=triton or attention=triton")
    ap.add_argument("--variant", dest="variants", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also run every profile with these overrides (on top of --set), e.g. "
                         "'gemm=triton,attention=triton'; repeatable: one more run per profile each")
    ap.add_argument("--no-resident", action="store_true",
                    help="skip the 4090's scheme all-resident (the throughput reference)")
    ap.add_argument("--schedules", default="",
                    help="run every profile with each of these schedules, e.g. 'sequential,batched' "
                         "(default: each profile's own)")
    ap.add_argument("--trace-ticks", type=int, default=0, metavar="N",
                    help="profile N full ticks of each run's first timed clip: kernel time by kind, PCIe copies and "
                         "the SMs' idle time per tick (those runs' FPS are then not speed measurements)")
    ap.add_argument("--tpp", action="store_true",
                    help="also one timestep-forcing rank (`--profile 4090 --gpus 4`, 24 GiB cap) and the "
                         "projected 4- and 5-GPU throughput")
    args = ap.parse_args(argv)
    device = with_index(torch.device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DiTConfig.from_dict(QUICK if args.quick else FULL)
    h, w = (16, 16) if args.quick else (48, 88)  # latent size of 704x384
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(msg)

    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "size": f"{w * 8}x{h * 8}"}

    def save():  # after every part, so that a later failure keeps what was measured
        (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))

    if not args.skip_accuracy:
        results["accuracy"] = accuracy(cfg, h, w, device, log)
        save()
    from lowvram.model.vae import VAEConfig, WanVAE

    with torch.device(device):
        vae = WanVAE(VAEConfig(dim=16 if args.quick else 96)).to(torch.bfloat16).eval()
    runs = []
    names = [n for n in args.profiles.split(",") if n]
    if not args.no_resident and "4090" in names:
        runs.append(("4090", None, dict(vram_budget_gib=76.0, kv_placement="gpu", kv_dtype="bf16",
                                        blocks_resident=40 if not args.quick else 4), "4090-all-resident"))
    from lowvram.runtime.profile import parse_set

    common = parse_set(args.sets)
    runs = [(n, c, {**(ov or {}), **common}, lbl) for n, c, ov, lbl in runs]
    if args.schedules:
        runs += [(n, CAPS.get(n), {**common, "schedule": sc}, f"{n} {sc}") for n in names
                 for sc in args.schedules.split(",")]
    else:
        runs += [(n, CAPS.get(n), common or None, n) for n in names]
    for var in args.variants:
        extra = parse_set([kv for kv in var.split(",") if kv])
        runs += [(n, CAPS.get(n), {**common, **extra}, f"{n} {var}") for n in names]
    results["profiles"] = []
    latents = {}  # profile -> schedule -> final latents of every block, for schedule_identity
    models = SharedModel(cfg, device)
    for name, cap, ov, label in runs:
        r, finals = guarded_run(label, cfg, name, cap, h, w, device, args.clips, log, vae=vae, overrides=ov or None,
                                models=models, trace_ticks=args.trace_ticks)
        if finals and label == f"{name} {r['schedule']}":  # a --schedules run
            latents.setdefault(name, {})[r["schedule"]] = finals
        results["profiles"].append(r)
        save()
    results["schedule_identity"] = schedule_identity(latents)
    results["tpp_ranks"] = []
    for variant in TPP_VARIANTS if args.tpp else ():
        try:
            r = tpp_rank_run(cfg, h, w, device, log, vae=vae, models=models, variant=variant)
        except Exception as e:
            import traceback

            r = {"label": f"tpp rank {variant}", "error": f"{type(e).__name__}: {e}"[:500]}
            log(f"[tpp rank {variant}] failed: {r['error']}")
            log(traceback.format_exc()[-1500:])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["tpp_ranks"].append(r)
        save()
    save()
    (out / "bench.log").write_text("\n".join(logs))
    print("\n| run | scheme | attn | batch | resident | KV | VAE beside DiT | s/clip | DiT s | VAE s | FPS | steady FPS | PCIe GB/fwd "
          "(plan; seq. plan) | copy busy | expected GiB | allocated GiB | reserved GiB | NVML GiB |")
    print("|" + "---|" * 18)
    for r in results["profiles"]:
        if "error" in r:
            print(f"| {r['label']} | error: {r['error'][:80]} |")
            continue
        print(f"| {r['label']} | {r['scheme']} | {r['attention']} | {r['batch']} | "
              f"{r['resident']}/{r['resident'] + r['streamed']} | {r['kv']} | {'yes' if r['vae_overlap'] else 'no'} | "
              f"{r['s_per_clip']} | {r['dit_s_per_clip']} | "
              f"{r['vae_s_per_clip']} | {r['fps']} | {r['steady_fps']} | {r['pcie_h2d_gb_per_forward']} "
              f"({r['plan_pcie_gb_per_forward']}; {r['plan_pcie_gb_per_forward_sequential']}) | "
              f"{r['copy_busy_fraction']} | {r['expected_peak_gib']} | {r['peak_allocated_gib']} | "
              f"{r['peak_reserved_gib']} | {r['peak_nvml_gib']} |")
    ok = {r["label"]: r for r in results["profiles"] if "error" not in r}
    for sc in ("sequential", "batched"):
        ref = ok.get(f"4090 {sc}") or ok.get("4090")
        for n in ("16gb", "12gb"):
            r = ok.get(f"{n} {sc}")
            if ref and r:
                print(f"{n} {sc} / 4090 {ref['schedule']}: {r['fps'] / ref['fps']:.2f}x FPS "
                      f"({r['steady_fps'] / ref['steady_fps']:.2f}x steady)")
    for ident in results["schedule_identity"]:
        print(f"{ident['profile']}: batched vs sequential final latents of {ident['blocks']} blocks: "
              + ("bit-identical" if ident["bit_identical"] else
                 f"differ, max |d| {ident['max_abs_diff']:.3g}, max relative L2 {ident['max_rel_l2']:.3g}"))
    for tpp in results["tpp_ranks"]:
        if "error" in tpp:
            print(f"{tpp['label']}: error: {tpp['error'][:120]}")
            continue
        print(f"{tpp['label']} ({tpp['kv']} KV, {tpp['resident']} resident, plan {tpp['plan_pcie_gb_per_forward']} "
              f"GB/fwd): forward {tpp['forward_s']} s, VAE {tpp['vae_s_per_block']} s/block, peak allocated "
              f"{tpp['peak_allocated_gib']} / reserved {tpp['peak_reserved_gib']} / NVML {tpp['peak_nvml_gib']} GiB "
              f"(plan {tpp['expected_peak_gib']}); PROJECTION: {tpp.get('projected_fps_4_gpus')} FPS on 4 GPUs, "
              f"{tpp.get('projected_fps_5_gpus')} on 5")
    if "accuracy" in results:
        print("accuracy (SQNR dB per forward vs bf16):", json.dumps(results["accuracy"]))


if __name__ == "__main__":
    main()
