"""The user's path at full size on one GPU (issue 13), in stages that each fit one device call of <= 9 min.

    python tools/user_path.py --stage write                  # the 47 GB synthetic checkpoint       ~1-3 min
    python tools/user_path.py --stage quantize --schemes int8  # lowvram quantize int8               ~2-4 min
    python tools/user_path.py --stage quantize --schemes fp8   # and fp8 (both in one call: ~4-7 min)  ~2-4 min
    python tools/user_path.py --stage quantize --devices cuda,cpu  # each scheme on the GPU and the CPU, compared
    python tools/user_path.py --stage run --only 4090-cold,4090-warm,4090-5clip                    ~4-6 min
    python tools/user_path.py --stage run --only 12gb,h100-80                                       ~3-4 min
    python tools/user_path.py --stage bench                  # tools/bench.py, the 4090 profile      ~2-3 min
    python tools/user_path.py --quick --stage all            # all of it on the CPU at tiny widths (CUDA parts skipped)

Each stage appends its results to ROOT/user_path.json (kept between calls) and copies it to $OUT, with one
log file per stage, and prints a short table last.

Disk and RAM plan for the GPU machine (64 GiB disk, 128 GiB RAM, /dev/shm is RAM):
- RAM (/dev/shm/lowvram-full, --shard-dir): the four bf16 DiT shards, 32.6 GB (30.4 GiB). They are the
  quantizer's input only; the runs never read them. A stage that finds them gone writes them again (same
  seed and device: the same bytes) before it quantizes.
- Disk (ROOT = .full/, ignored): Wan2.2-S2V-14B/ with the umT5 .pth (11.4 GB), the VAE (0.5), wav2vec2
  (1.3), the tokenizer, config and index (the shards are symlinks into /dev/shm), LiveAvatar/ (LoRA, 1.35),
  then int8/ (16.7 GB) and fp8/ (16.7 GB) from `lowvram quantize`, whose components are hard links into
  Wan2.2-S2V-14B/. Total on disk: 47.8 GB (44.5 GiB); the largest RAM use is the 30.4 GiB tmpfs plus one
  process (the 4090 run's target is <= 40 GB RSS), so 128 GiB holds it with the page cache to spare.
- Page cache: a "cold" run first evicts every file it reads (posix_fadvise DONTNEED after fdatasync; tmpfs
  pages cannot be evicted and the runs do not read them) and empties the prompt cache.

Python packages: the GPU image lacks PyAV and ftfy, which `lowvram run` needs (carry the wheels av, ftfy and
wcwidth), and bitsandbytes, which the 12gb profile's int8 T5 needs; without it that run gets --set t5=cpu and
its record says so.

Stages:
- write: lowvram.demo.full.write_full with the random numbers made on the GPU; per-file time and peak RSS.
- quantize: the plain read time of the input (DiT shards + LoRA, after eviction; disk read speed measured on
  the T5 file as well), then `lowvram quantize` int8 and fp8 with `--device` each of --devices: wall and CPU
  time, peak RSS (VmHWM polled, and the manifest's own figure), bytes read/written (/proc/<pid>/io), against
  peak RSS <= one output shard + 3 GB and time <= 2x the plain read. With several devices the first one's
  output stays (ROOT/int8, ROOT/fp8); each other one is written beside it (16.7 GB more on the disk for a
  while), compared with it tensor by tensor (compare_outputs: tensors, codes and scales that differ, and by how
  much) and removed.
- run: `lowvram run` at 704*384 with the carried portrait and speech (MEDIA/portrait.png, speech.wav,
  inputs.json from tools/make_user_inputs.py): 4090-cold (--profile 4090 --vram-cap-gib 24, page cache and
  prompt cache cold), 4090-warm (the same again: warm cache, prompt cache hit), 4090-5clip (--num-clip 5),
  12gb (--profile 12gb --vram-cap-gib 12), h100-80 (fp8 directory, uncapped). Beside each: NVML peak (nvidia-smi
  polled), peak host RSS, VmPin/VmLck, /proc io, the mp4's growth; after: the --report JSON (RunResult and
  phases; fields it lacks are left out), and the mp4 checked with PyAV (frames, fps, audio/video durations).
- bench: `python tools/bench.py --profiles 4090 --clips 2 --skip-accuracy --no-resident`, and the 4090 runs'
  steady seconds per clip against its number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_LOGS: list[Path] = []  # the logs of the stage in progress, copied to $OUT by record()
RUNS = ("4090-cold", "4090-warm", "4090-5clip", "12gb", "h100-80")
GB = 1e9


# ---- measuring a child process


def _proc_fields(pid: int, name: str, keys) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in keys:
                parts = v.split()
                out[k] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except (OSError, ValueError):
        pass
    return out


def _nvidia_smi(*query: str) -> list[str]:
    try:
        return subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []


def gpu_used_bytes() -> int | None:
    lines = _nvidia_smi("--query-gpu=memory.used")
    return int(lines[0]) * 2**20 if lines and lines[0].strip().isdigit() else None


class Watch:
    """Polls a running child: VmHWM/VmRSS/VmPin/VmLck, /proc io, the size of a file it writes, and (in a
    second thread) its GPU memory from nvidia-smi, per process and for the whole GPU."""

    def __init__(self, proc: subprocess.Popen, watch_file: Path | None = None, interval: float = 0.1):
        self.proc, self.file, self.interval = proc, watch_file, interval
        self.t0 = time.perf_counter()
        self.status, self.io, self.nvml_proc, self.nvml_total = {}, {}, 0, 0
        self.file_events: dict[str, float] = {}
        self.gpu_base = gpu_used_bytes() if shutil.which("nvidia-smi") else None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, daemon=True)]
        if self.gpu_base is not None:
            self._threads.append(threading.Thread(target=self._poll_gpu, daemon=True))
        for t in self._threads:
            t.start()

    def _poll(self):
        pid, first = self.proc.pid, None
        while not self._stop.is_set():
            st = _proc_fields(pid, "status", ("VmHWM", "VmRSS", "VmPin", "VmLck"))
            for k, v in st.items():
                self.status[k] = max(self.status.get(k, 0), v)
            io = _proc_fields(pid, "io", ("rchar", "wchar", "read_bytes", "write_bytes"))
            if io:
                self.io = io
            if self.file is not None and self.file.exists():
                size, now = self.file.stat().st_size, time.perf_counter() - self.t0
                self.file_events.setdefault("created_s", now)
                if first is None:
                    first = size
                if size > first + 4096:
                    self.file_events.setdefault("first_growth_s", now)  # the first block's fragment landed
            self._stop.wait(self.interval)

    def _poll_gpu(self):
        pid = str(self.proc.pid)
        while not self._stop.is_set():
            for line in _nvidia_smi("--query-compute-apps=pid,used_memory"):
                p, _, mib = line.partition(",")
                if p.strip() == pid and mib.strip().isdigit():
                    self.nvml_proc = max(self.nvml_proc, int(mib) * 2**20)
            used = gpu_used_bytes()
            if used is not None:
                self.nvml_total = max(self.nvml_total, used - self.gpu_base)
            self._stop.wait(0.05)

    def stop(self) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
        out = {"peak_rss_bytes": self.status.get("VmHWM"), "vm_pin_bytes": self.status.get("VmPin"),
               "vm_lck_bytes": self.status.get("VmLck"), "io": self.io, **self.file_events}
        if self.gpu_base is not None:
            out.update(nvml_process_peak_bytes=self.nvml_proc or None, nvml_gpu_peak_bytes=self.nvml_total)
        return out


def run_child(name: str, cmd: list[str], log_dir: Path, env=None, timeout: float = 480, watch_file=None) -> dict:
    """Run cmd with its output in log_dir/name.log, measured by a Watch; returns the measurements."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    _LOGS.append(log_path)
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=REPO)
        watch = Watch(proc, watch_file)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of the child: its exact CPU time
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    res = {"name": name, "cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(wall, 2),
           "timed_out": wall >= timeout, "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "ru_maxrss_bytes": usage.ru_maxrss * 1024, **watch.stop()}
    text = log_path.read_text(errors="replace")
    res["log"], res["log_tail"] = str(log_path), [line[-300:] for line in text.splitlines()[-25:]]
    res["prompt_cache_hit"] = "prompt embedding: from cache" in text or None
    print(f"[{name}] rc {res['rc']} in {wall:.1f} s, peak RSS {_gib(res.get('peak_rss_bytes'))} GiB", flush=True)
    return res


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


# ---- files and the page cache


def files_under(*paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p.resolve())
        elif p.is_dir():
            out += [f.resolve() for f in sorted(p.rglob("*")) if f.is_file()]
    return sorted(set(out))


def evict(paths) -> int:
    """Drop the page cache of these files (clean pages only: dirty ones are written first); returns bytes."""
    total = 0
    for f in files_under(*paths):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def read_all(paths, block: int = 16 << 20, limit: int | None = None) -> dict:
    """Read the files once, sequentially (at most `limit` bytes); bytes, seconds and GB/s."""
    buf = bytearray(block)
    n, t0 = 0, time.perf_counter()
    for f in files_under(*paths):
        with open(f, "rb", buffering=0) as fh:
            while (limit is None or n < limit) and (k := fh.readinto(buf)) > 0:
                n += k
    sec = time.perf_counter() - t0
    return {"bytes": n, "seconds": round(sec, 2), "gb_per_s": round(n / GB / max(sec, 1e-9), 2)}


def fs_of(path: Path) -> dict:
    path = Path(path)
    while not path.exists():
        path = path.parent
    du = shutil.disk_usage(path)
    return {"path": str(path), "free_gb": round(du.free / GB, 1), "total_gb": round(du.total / GB, 1)}


# ---- the stages


class Ctx:
    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.root = Path(args.root or (".full/quick" if args.quick else ".full")).resolve()
        shard = args.shard_dir or (str(self.root / "shm") if args.quick else "/dev/shm/lowvram-full")
        self.shard_dir = None if shard == "none" else Path(shard)
        self.out = Path(args.out or os.environ.get("OUT") or self.root / "out").resolve()
        self.src = self.root / "Wan2.2-S2V-14B"
        self.lora = self.root / "LiveAvatar" / "liveavatar.safetensors"
        self.logs = self.root / "logs"
        self.cuda = bool(shutil.which("nvidia-smi")) and not args.quick
        self.py = [sys.executable]

    def spec(self):
        from lowvram.demo.full import FullSpec

        return FullSpec.small(num_layers=4) if self.quick else FullSpec.real()

    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() and not self.quick else "cpu"


def stage_write(ctx: Ctx) -> dict:
    from lowvram.demo.full import write_full

    spec, device = ctx.spec(), ctx.device()
    plan = write_full(ctx.root, spec, device=device, shard_dir=ctx.shard_dir, resume=True, dry_run=True)
    need_ram = sum(f["bytes"] for f in plan["files"] if f.get("path", "").startswith(str(ctx.shard_dir or "\0"))
                   and not f.get("skipped"))
    need_disk = sum(f["bytes"] for f in plan["files"] if "path" in f and not f.get("skipped")) - need_ram
    where = {"disk": fs_of(ctx.root), "shard_dir": fs_of(ctx.shard_dir) if ctx.shard_dir else None,
             "need_disk_gb": round(need_disk / GB, 1), "need_shard_dir_gb": round(need_ram / GB, 1)}
    print(f"plan: {json.dumps(where)}", flush=True)
    if ctx.shard_dir and need_ram > shutil.disk_usage(fs_of(ctx.shard_dir)["path"]).free:
        raise SystemExit(f"{ctx.shard_dir} has {where['shard_dir']['free_gb']} GB free, the DiT shards need "
                         f"{where['need_shard_dir_gb']} GB; pass --shard-dir elsewhere (or none: on disk)")
    rep = write_full(ctx.root, spec, device=device, shard_dir=ctx.shard_dir, resume=True)
    from lowvram.io.lora import LoraSet
    from lowvram.io.weights import discover

    ckpt = discover(ctx.src)  # headers only: the layout and every shape, before anything reads the tensors
    lora = LoraSet.load(ctx.lora)
    lora.check(ckpt.shapes())
    check = {"dit_keys": len(ckpt.shapes()), "lora": lora.summary()}
    files = [{k: f.get(k) for k in ("file", "bytes", "seconds", "peak_rss_bytes", "rss_before_bytes", "skipped")}
             for f in rep["files"]]
    return {"stage": "write", "device": device, "plan": where, "check": check, "seconds": rep["seconds"],
            "written_gb": round(rep["written_bytes"] / GB, 2), "total_gb": round(rep["bytes"] / GB, 2),
            "gb_per_s": round(rep["written_bytes"] / GB / max(rep["seconds"], 1e-9), 2),
            "peak_rss_bytes": rep["peak_rss_bytes"], "start_rss_bytes": rep["start_rss_bytes"], "files": files}


def _ensure_source(ctx: Ctx) -> dict | None:
    """Rewrite whatever of the source is gone (a tmpfs emptied between calls); None when all is there."""
    from lowvram.demo.full import write_full

    plan = write_full(ctx.root, ctx.spec(), device=ctx.device(), shard_dir=ctx.shard_dir, resume=True, dry_run=True)
    if all(f.get("skipped", True) for f in plan["files"]):
        return None
    print("source files are missing: writing them again", flush=True)
    return stage_write(ctx)


def compare_outputs(a: Path, b: Path) -> dict:
    """Two `lowvram quantize` directories tensor by tensor (e.g. --device cuda against --device cpu): how many
    tensors and elements differ, and by how much. 8-bit codes in quanta (INT8: integer steps; FP8: steps along
    the e4m3 grid, ordered by sign and magnitude), other tensors (scales, bf16) as the largest relative change."""
    import torch
    from safetensors import safe_open

    index = "diffusion_pytorch_model.safetensors.index.json"  # lowvram.constants.INDEX_FILE
    maps = [json.loads((d / index).read_text())["weight_map"] for d in (a, b)]
    keys = sorted(set(maps[0]) & set(maps[1]))
    res = {"a": str(a), "b": str(b), "tensors": len(keys), "identical": 0,
           "only_in_one": sorted(set(maps[0]) ^ set(maps[1])), "codes_total": 0, "codes_differing": 0,
           "max_quanta": 0, "scale_rows_differing": 0, "max_scale_rel": 0.0,
           "other_tensors_differing": 0, "differing": []}

    def ordinal(q):  # codes as integers whose differences count quanta
        if q.dtype == torch.int8:
            return q.int()
        u = q.view(torch.uint8).int()  # e4m3 bits: the sign, then 7 bits that grow with the magnitude
        return torch.where(u >= 128, -(u & 0x7F), u & 0x7F)

    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for key in keys:
        with safe_open(str(a / maps[0][key]), "pt") as fa, safe_open(str(b / maps[1][key]), "pt") as fb:
            x, y = fa.get_tensor(key).reshape(-1), fb.get_tensor(key).reshape(-1)
        if key.endswith(".qweight"):
            res["codes_total"] += x.numel()
        row = {"key": key, "dtype": str(x.dtype).replace("torch.", ""), "elements": x.numel()}
        if x.shape != y.shape or x.dtype != y.dtype:
            row["error"] = f"{x.numel()} {x.dtype} vs {y.numel()} {y.dtype}"
            res["other_tensors_differing"] += 1
            res["differing"].append(row)
            continue
        ne = x.view(bits[x.element_size()]) != y.view(bits[y.element_size()])  # bit for bit, element by element
        row["differing"] = int(ne.sum())
        if not row["differing"]:
            res["identical"] += 1
            continue
        xs, ys = x[ne], y[ne]  # only the differing elements from here on
        if key.endswith(".qweight"):
            row["max_quanta"] = int((ordinal(xs) - ordinal(ys)).abs().max())
            res["codes_differing"] += row["differing"]
            res["max_quanta"] = max(res["max_quanta"], row["max_quanta"])
        else:
            xf, yf = xs.double(), ys.double()
            row["max_rel"] = ((xf - yf).abs() / xf.abs().clamp_min(1e-30)).max().item()
            if key.endswith(".scale"):
                res["scale_rows_differing"] += row["differing"]
                res["max_scale_rel"] = max(res["max_scale_rel"], row["max_rel"])
            else:
                res["other_tensors_differing"] += 1
        res["differing"].append(row)
    res["tensors_differing"] = len(res["differing"])
    res["differing"] = sorted(res["differing"], key=lambda r: -r.get("differing", 0))[:20]  # the worst, for the log
    return res


def _quant_out(ctx: Ctx, scheme: str) -> Path:
    return ctx.root / scheme


def stage_quantize(ctx: Ctx) -> dict:
    rewrite = _ensure_source(ctx)
    shards = sorted(ctx.src.glob("diffusion_pytorch_model-*.safetensors"))
    inputs = shards + [ctx.lora]
    in_bytes = sum(p.resolve().stat().st_size for p in inputs)
    evict(inputs)
    plain = read_all(inputs)  # the reference: reading the input once
    evict([ctx.src / "models_t5_umt5-xxl-enc-bf16.pth"])
    # this disk's read speed (the shards may be on a tmpfs): 4 GB of the T5 file, cold
    disk = read_all([ctx.src / "models_t5_umt5-xxl-enc-bf16.pth"], limit=4 * 10**9)
    res = {"stage": "quantize", "input_bytes": in_bytes, "plain_read": plain, "disk_read_t5": disk,
           "rewrote_source": rewrite is not None, "schemes": []}
    devices = [ctx.device() if d == "auto" else d for d in ctx.args.devices.split(",") if d]
    res["devices"], res["compare"] = devices, []
    for scheme in ctx.args.schemes.split(","):
        outs = []
        for k, device in enumerate(devices):  # the first device's output is the one the runs use
            out = _quant_out(ctx, scheme) if k == 0 else ctx.root / f"{scheme}.{k}-{device.replace(':', '')}"
            r = _quantize_once(ctx, scheme, device, out, inputs, in_bytes, plain, disk)
            res["schemes"].append(r)
            if r.get("rc") == 0:
                outs.append(out)
        for out in outs[1:]:  # against the first, then removed (the disk holds one output of each scheme)
            print(f"[compare] {outs[0].name} against {out.name}", flush=True)
            t0 = time.perf_counter()
            cmp = compare_outputs(outs[0], out)
            cmp.update(scheme=scheme, seconds=round(time.perf_counter() - t0, 1))
            res["compare"].append(cmp)
            shutil.rmtree(out, ignore_errors=True)
    return res


def _quantize_once(ctx: Ctx, scheme: str, device: str, out: Path, inputs, in_bytes: int, plain: dict,
                   disk: dict) -> dict:
    """One `lowvram quantize --device device` into out, measured (wall, CPU, RSS, io) against the targets."""
    need = 0.55 * in_bytes  # 8-bit weights and fp32 scales: ~0.51x of bf16
    free = shutil.disk_usage(fs_of(out)["path"]).free + sum(f.stat().st_size for f in files_under(out)
                                                              if f.stat().st_nlink == 1)
    if need > free:
        return {"scheme": scheme, "device": device,
                "error": f"{free / GB:.1f} GB free for {out}, {need / GB:.1f} needed"}
    shutil.rmtree(out, ignore_errors=True)  # the conversion stages its output beside --out: make room first
    evict(inputs)
    cmd = ctx.py + ["-m", "lowvram.cli.main", "quantize", "--ckpt-dir", str(ctx.src), "--lora", str(ctx.lora),
                    "--scheme", scheme, "--out", str(out), "--force", "--device", device]
    if ctx.quick:
        cmd += ["--shard-size", "1MB"]
    r = run_child(f"quantize-{scheme}-{device.replace(':', '')}", cmd, ctx.logs, timeout=ctx.args.timeout)
    r.update(scheme=scheme, device=device)
    manifest = out / "manifest.json"  # lowvram.quantize.format.MANIFEST_NAME
    man = json.loads(manifest.read_text()) if r["rc"] == 0 and manifest.is_file() else {}
    shard_sizes = [s["size"] for s in man.get("shards", [])] or [f.stat().st_size for f in out.glob("*.safetensors")]
    r["output_bytes"] = sum(shard_sizes)
    r["largest_output_shard_bytes"] = max(shard_sizes, default=0)
    r["manifest_peak_rss_bytes"] = man.get("peak_rss_bytes")
    r["busy_s"] = man.get("seconds")  # the conversion's wall time and each thread's busy seconds
    r["lowest_sqnr_db"] = min((v["sqnr_db"] for v in man.get("layers", {}).values()), default=None)
    peak = max(v for v in (r.get("peak_rss_bytes"), r["manifest_peak_rss_bytes"], 0) if v is not None)
    r["target_rss_bytes"] = r["largest_output_shard_bytes"] + 3 * 10**9
    r["rss_ok"] = peak <= r["target_rss_bytes"]
    r["time_ratio"] = round(r["wall_s"] / max(plain["seconds"], 1e-9), 2)
    r["time_ratio_vs_disk_speed"] = round(r["wall_s"] / max(in_bytes / GB / max(disk["gb_per_s"], 1e-9), 1e-9), 2)
    r["time_ok"] = r["time_ratio"] <= 2.0
    return r


def _media(ctx: Ctx) -> dict:
    """The carried portrait, speech and prompt (tools/make_user_inputs.py); made here when absent."""
    media = Path(ctx.args.media or (ctx.root / "media" if ctx.quick else ".media")).resolve()
    info_path = media / "inputs.json"
    if not (media / "portrait.png").is_file() or not (media / "speech.wav").is_file():
        from lowvram.demo.inputs import photo_portrait, speech_wav

        print(f"{media} lacks portrait.png/speech.wav: making them here (run tools/make_user_inputs.py on a "
              "machine with espeak-ng and carry the folder for real speech)", flush=True)
        media.mkdir(parents=True, exist_ok=True)
        w, h = (144, 256) if ctx.quick else (720, 1280)
        photo_portrait(str(media / "portrait.png"), width=w, height=h)
        if ctx.quick:
            speech = speech_wav(str(media / "speech.wav"), text="Hello there, this is a short test.", min_seconds=2.5)
        else:
            speech = speech_wav(str(media / "speech.wav"), min_seconds=10.0)
        info_path.write_text(json.dumps({"speech": speech}))
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    prompt = info.get("prompt") or "A person talks to the camera in a softly lit room, head and shoulders."
    return {"image": str(media / "portrait.png"), "audio": str(media / "speech.wav"), "prompt": prompt,
            "speech": info.get("speech")}


def _cli_supports(ctx: Ctx) -> dict:
    text = subprocess.run(ctx.py + ["-m", "lowvram.cli.main", "run", "--help"], capture_output=True, text=True,
                          cwd=REPO).stdout
    return {"report": "--report" in text, "vram_cap": "--vram-cap-gib" in text}


def check_mp4(path: Path) -> dict:
    """Frames, fps and the video and audio durations of an mp4, read with PyAV (packets counted, audio decoded)."""
    import av

    if not path.is_file():
        return {"error": "no file"}
    out = {"bytes": path.stat().st_size}
    try:
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            out.update(width=v.codec_context.width, height=v.codec_context.height,
                       fps=float(v.average_rate or v.guessed_rate or 0))
            frames = sum(1 for p in c.demux(v) if p.size)
            out["frames"] = frames
            out["video_s"] = round(frames / out["fps"], 3) if out["fps"] else None
        with av.open(str(path)) as c:
            if c.streams.audio:
                a = c.streams.audio[0]
                samples = sum(f.samples for f in c.decode(a))
                out.update(audio_rate=a.rate, audio_s=round(samples / a.rate, 3))
    except Exception as e:  # a damaged file is a finding, not a crash of the driver
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    if out.get("video_s") and out.get("audio_s"):
        out["av_diff_s"] = round(out["audio_s"] - out["video_s"], 3)
    return out


def summarize_report(rep: dict) -> dict:
    """The figures of a --report JSON (RunResult + phases), tolerating fields it does not have."""
    if not rep:
        return {}
    phases = rep.get("phases") or []
    by = {}
    for p in phases:
        if isinstance(p, dict) and "name" in p:
            by[p["name"]] = p
    clips = [p.get("seconds") for n, p in by.items() if n.lower().startswith("clip") and p.get("seconds") is not None]
    out = {k: rep.get(k) for k in ("frames", "clips", "blocks", "seconds", "fps", "peak_vram", "interrupted")
           if k in rep}
    timings = rep.get("timings") or {}  # RunResult.timings: setup_s, first_frame_s, dit_s, vae_s, write_s, clip_s
    for k in ("ttff_s", "time_to_first_frame_s", "first_frame_s"):
        if k in rep or k in timings:
            out["ttff_s"] = rep.get(k, timings.get(k))
    out.update({k: timings[k] for k in ("setup_s", "dit_s", "vae_s", "write_s", "total_s") if k in timings})
    clips = clips or [c for c in timings.get("clip_s") or [] if isinstance(c, (int, float))]
    first = next((p for n, p in by.items() if "first" in n.lower()), None)
    if first is not None and "ttff_s" not in out:
        out["ttff_s"] = first.get("seconds")
    if len(clips) > 1:
        out["steady_s_per_clip"] = round(statistics.median(clips[1:]), 3)
    elif rep.get("clips") and rep.get("seconds"):
        out["mean_s_per_clip"] = round(rep["seconds"] / rep["clips"], 3)
    out["phases"] = [{k: p.get(k) for k in ("name", "seconds", "peak_allocated", "peak_reserved") if k in p}
                     for p in phases if isinstance(p, dict)]
    plan = rep.get("plan") or {}
    out["plan"] = {k: v for k, v in plan.items() if isinstance(v, (int, float, str, bool))}
    host = rep.get("host") or {}
    pinned = {k: v for d in (rep, plan, host) for k, v in d.items() if "pinned" in k.lower() and isinstance(v, (int, float))}
    if "peak_rss_bytes" in host:
        out["peak_rss_bytes"] = host["peak_rss_bytes"]
    if pinned:
        out["pinned"] = pinned
    return out


def _run_args(ctx: Ctx, name: str) -> tuple[str, list[str], dict]:
    """(checkpoint scheme, extra CLI args, env) of one named run."""
    clips = (2 if ctx.quick else 5) if name == "4090-5clip" else ctx.args.clips
    profile, cap, scheme = {"4090-cold": ("4090", 24, "int8"), "4090-warm": ("4090", 24, "int8"),
                            "4090-5clip": ("4090", 24, "int8"), "12gb": ("12gb", 12, "int8"),
                            "h100-80": ("h100-80", None, "fp8")}[name]
    args = ["--profile", profile, "--num-clip", str(clips)]
    env = {}
    if ctx.quick:
        cap = None  # the allocator cap needs CUDA
    if name == "12gb":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:  # the profile's int8 T5 needs it
            args += ["--set", "t5=cpu"]
            env["note"] = "bitsandbytes missing: --set t5=cpu instead of the profile's int8 T5"
    return scheme, args, {"cap": cap, **env}


def stage_run(ctx: Ctx) -> dict:
    import importlib.util

    missing = [m for m in ("av", "ftfy") if importlib.util.find_spec(m) is None]
    if missing:  # lowvram run writes the mp4 with PyAV and cleans prompts with ftfy
        raise SystemExit(f"python lacks {', '.join(missing)}: carry their wheels (av, ftfy, wcwidth; README of the "
                         "device tool) and install them before --stage run")
    media = _media(ctx)
    supports = _cli_supports(ctx)
    cache = ctx.root / "prompt-cache"
    res = {"stage": "run", "media": media, "cli": supports, "runs": []}
    names = [n for n in (ctx.args.only.split(",") if ctx.args.only else RUNS) if n]
    for name in names:
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r}; choose from {', '.join(RUNS)}")
        scheme, extra, opt = _run_args(ctx, name)
        ckpt = _quant_out(ctx, scheme)
        if not (ckpt / "config.json").is_file():
            res["runs"].append({"name": name, "error": f"{ckpt} is missing: run --stage quantize first"})
            continue
        if name == "4090-cold":
            shutil.rmtree(cache, ignore_errors=True)
            res["evicted_bytes"] = evict([ckpt, ctx.src / "models_t5_umt5-xxl-enc-bf16.pth", ctx.src / "Wan2.1_VAE.pth",
                                          ctx.src / "wav2vec2-large-xlsr-53-english", ctx.src / "google"])
        out_dir, rep_path = ctx.root / "videos", ctx.root / "reports" / f"{name}.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        rep_path.parent.mkdir(parents=True, exist_ok=True)
        rep_path.unlink(missing_ok=True)
        mp4 = out_dir / f"{name}.mp4"
        mp4.unlink(missing_ok=True)
        cmd = ctx.py + ["-m", "lowvram.cli.main", "run", "--ckpt-dir", str(ckpt), "--image", media["image"],
                        "--audio", media["audio"], "--prompt", media["prompt"], "--size", ctx.args.size,
                        "--out", str(mp4)] + extra
        env = {"LOWVRAM_CACHE": str(cache)}
        if ctx.quick:
            cmd += ["--device", "cpu"]
        if opt["cap"] is not None:
            if supports["vram_cap"]:
                cmd += ["--vram-cap-gib", str(opt["cap"])]
            env["LOWVRAM_VRAM_CAP_GIB"] = str(opt["cap"])
        if supports["report"]:
            cmd += ["--report", str(rep_path)]
        r = run_child(f"run-{name}", cmd, ctx.logs, env=env, timeout=ctx.args.timeout, watch_file=mp4)
        rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
        if opt.get("note"):
            r["note"] = opt["note"]
        r.update(name=name, profile=extra[1], scheme=scheme, cap_gib=opt["cap"], report=summarize_report(rep),
                 mp4=check_mp4(mp4))
        r["final_line"] = next((ln for ln in reversed(r["log_tail"]) if ln.startswith(("wrote ", "interrupted"))), None)
        res["runs"].append(r)
    return res


def stage_bench(ctx: Ctx) -> dict:
    out = ctx.root / "bench"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ctx.py + ["tools/bench.py", "--profiles", "4090", "--clips", "2", "--skip-accuracy", "--no-resident",
                    "--out", str(out)]
    if ctx.quick:
        cmd += ["--quick", "--device", "cpu", "--clips", "1"]
    r = run_child("bench", cmd, ctx.logs, timeout=ctx.args.timeout)
    bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    prof = next((p for p in bench.get("profiles", []) if p.get("label") == "4090"), {})
    r.update(stage="bench", s_per_clip=prof.get("s_per_clip"), fps=prof.get("fps"),
             peak_nvml_gib=prof.get("peak_nvml_gib"), peak_reserved_gib=prof.get("peak_reserved_gib"),
             error=prof.get("error"))
    ours = [run["report"].get("steady_s_per_clip") for st in _load(ctx).get("stages", []) if st.get("stage") == "run"
            for run in st.get("runs", []) if run.get("name", "").removeprefix("run-").startswith("4090")
            and run.get("report")]
    ours = [s for s in ours if s]
    if ours and r["s_per_clip"]:
        r["user_path_steady_s_per_clip"] = min(ours)
        r["ratio_to_bench"] = round(min(ours) / r["s_per_clip"], 3)
    return r


# ---- the log and the table


def _load(ctx: Ctx) -> dict:
    path = ctx.root / "user_path.json"
    return json.loads(path.read_text()) if path.is_file() else {"stages": []}


def _machine() -> dict:
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    gpu = _nvidia_smi("--query-gpu=name,memory.total,driver_version")
    return {"cpus": os.cpu_count(), "mem_total_gb": round(mem.get("MemTotal", 0) / GB, 1), "gpu": gpu[0] if gpu else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def record(ctx: Ctx, result: dict) -> None:
    result = {**result, "machine": _machine(), "quick": ctx.quick}
    log = _load(ctx)
    log["stages"].append(result)
    ctx.root.mkdir(parents=True, exist_ok=True)
    (ctx.root / "user_path.json").write_text(json.dumps(log, indent=1, default=str))
    ctx.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(ctx.root / "user_path.json", ctx.out / "user_path.json")
    with open(ctx.out / f"logs-{result['stage']}.txt", "w") as f:  # the tail of every log of this stage
        for p in _LOGS:
            if p.is_file():
                f.write(f"==== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-200:]) + "\n")
    _LOGS.clear()


def _fmt(v, nd=1):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(result: dict) -> str:
    st = result["stage"]
    rows = []
    if st == "write":
        rows.append("| file | GB | s | peak RSS GiB |")
        rows.append("|---|---|---|---|")
        for f in result["files"]:
            rows.append(f"| {f['file']} | {_fmt((f.get('bytes') or 0) / GB, 2)} | {_fmt(f.get('seconds'))} | "
                        f"{_gib(f.get('peak_rss_bytes'))}{' (kept)' if f.get('skipped') else ''} |")
        rows.append(f"| total ({result['device']}) | {result['written_gb']} written | {result['seconds']} | "
                    f"{_gib(result['peak_rss_bytes'])} |")
    elif st == "quantize":
        p = result["plain_read"]
        rows.append(f"plain read of the input: {p['bytes'] / GB:.2f} GB in {p['seconds']} s ({p['gb_per_s']} GB/s); "
                    f"disk read of the T5 file {result['disk_read_t5']['gb_per_s']} GB/s")
        rows.append("| scheme | device | rc | wall s | CPU s | x plain read | x disk read | peak RSS GiB (polled / "
                    "manifest) | target GiB | out GB | read GB | written GB |")
        rows.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in result["schemes"]:
            if "error" in r and "rc" not in r:
                rows.append(f"| {r['scheme']} | {r.get('device', '-')} | error: {r['error']} |")
                continue
            io = r.get("io") or {}
            rows.append(f"| {r['scheme']} | {r.get('device', '-')} | {r['rc']} | {r['wall_s']} | "
                        f"{r.get('cpu_s', '-')} | {r['time_ratio']} | {r['time_ratio_vs_disk_speed']} | "
                        f"{_gib(r.get('peak_rss_bytes'))} / "
                        f"{_gib(r.get('manifest_peak_rss_bytes'))} | {_gib(r['target_rss_bytes'])} | "
                        f"{_fmt(r['output_bytes'] / GB, 2)} | {_fmt(io.get('read_bytes', 0) / GB, 2)} | "
                        f"{_fmt(io.get('write_bytes', 0) / GB, 2)} |")
        for r in result["schemes"]:
            if r.get("busy_s"):
                rows.append(f"{r['scheme']} on {r['device']}, seconds busy (of {r['busy_s'].get('wall')} s "
                            "converting): " + ", ".join(f"{k} {v}" for k, v in r["busy_s"].items() if k != "wall")
                            + f"; lowest SQNR {r.get('lowest_sqnr_db')} dB")
        for c in result.get("compare", []):
            rows.append(f"{c['scheme']} {Path(c['a']).name} vs {Path(c['b']).name}: {c['tensors_differing']} of "
                        f"{c['tensors']} tensors differ; codes {c['codes_differing']} of {c['codes_total']} differ, "
                        f"by at most {c['max_quanta']} quanta; scales {c['scale_rows_differing']} rows, by at most "
                        f"{c['max_scale_rel']:.2e} relative; other tensors differing: {c['other_tensors_differing']}"
                        + (f"; only in one: {len(c['only_in_one'])}" if c["only_in_one"] else ""))
    elif st == "run":
        rows.append("| run | rc | wall s | TTFF s (report / mp4 growth) | s/clip | peak VRAM GiB (alloc / NVML) | "
                    "peak RSS GiB | frames | fps | video s | audio s | T5 cache |")
        rows.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in result["runs"]:
            if "rc" not in r:
                rows.append(f"| {r['name']} | error: {r.get('error')} |")
                continue
            rep, mp4 = r.get("report") or {}, r.get("mp4") or {}
            spc = rep.get("steady_s_per_clip") or rep.get("mean_s_per_clip")
            rows.append(f"| {r['name']} | {r['rc']} | {r['wall_s']} | {_fmt(rep.get('ttff_s'))} / "
                        f"{_fmt(r.get('first_growth_s'))} | {_fmt(spc, 2)} | {_gib(rep.get('peak_vram'))} / "
                        f"{_gib(r.get('nvml_process_peak_bytes') or r.get('nvml_gpu_peak_bytes'))} | "
                        f"{_gib(r.get('peak_rss_bytes'))} | {mp4.get('frames', '-')} | {_fmt(mp4.get('fps'))} | "
                        f"{_fmt(mp4.get('video_s'), 2)} | {_fmt(mp4.get('audio_s'), 2)} | "
                        f"{'hit' if r.get('prompt_cache_hit') else 'miss'} |")
        phases = [p.get("name") for r in result["runs"] for p in (r.get("report") or {}).get("phases", [])]
        names = list(dict.fromkeys(n for n in phases if n))
        runs = [r for r in result["runs"] if (r.get("report") or {}).get("phases")]
        if names:
            rows.append("\nphase: seconds / peak allocated GiB / peak reserved GiB")
            rows.append("| phase | " + " | ".join(r["name"] for r in runs) + " |")
            rows.append("|---|" + "---|" * len(runs))
            for n in names:
                cells = []
                for r in runs:
                    p = next((p for p in r["report"]["phases"] if p.get("name") == n), None)
                    cells.append("-" if p is None else f"{_fmt(p.get('seconds'), 2)} / {_gib(p.get('peak_allocated'))}"
                                 f" / {_gib(p.get('peak_reserved'))}")
                rows.append(f"| {n} | " + " | ".join(cells) + " |")
    elif st == "bench":
        rows.append(f"bench 4090: rc {result['rc']}, {result.get('s_per_clip')} s/clip, {result.get('fps')} FPS, "
                    f"NVML {result.get('peak_nvml_gib')} GiB; user path steady {result.get('user_path_steady_s_per_clip')}"
                    f" s/clip (ratio {result.get('ratio_to_bench')})")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=["write", "quantize", "run", "bench", "all"])
    ap.add_argument("--root", default=None, help="where the checkpoint and outputs live (default .full, or .full/quick)")
    ap.add_argument("--shard-dir", default=None,
                    help="where the bf16 DiT shards go (default /dev/shm/lowvram-full; 'none': inside --root)")
    ap.add_argument("--media", default=None, help="folder with portrait.png, speech.wav, inputs.json (default .media)")
    ap.add_argument("--out", default=None, help="results folder (default $OUT)")
    ap.add_argument("--schemes", default="int8,fp8")
    ap.add_argument("--devices", default="auto",
                    help="quantize stage: `lowvram quantize --device` for each, comma-separated (auto: cuda when there "
                         "is a GPU); the first one's output is kept for the runs, the others are compared with it and "
                         "removed")
    ap.add_argument("--only", default=None, help=f"runs of --stage run, comma-separated: {','.join(RUNS)}")
    ap.add_argument("--clips", type=int, default=2, help="clips of each run but 4090-5clip")
    ap.add_argument("--size", default=None, help="pixel-area budget (default 704*384; 64*112 with --quick)")
    ap.add_argument("--timeout", type=float, default=480, help="seconds one child process may take")
    ap.add_argument("--quick", action="store_true", help="tiny widths on the CPU: a dry run of every stage")
    args = ap.parse_args(argv)
    args.size = args.size or ("64*112" if args.quick else "704*384")
    if args.quick:
        args.clips = min(args.clips, 1)
    ctx = Ctx(args)
    stages = ["write", "quantize", "run", "bench"] if args.stage == "all" else [args.stage]
    tables = []
    for st in stages:
        t0 = time.perf_counter()
        result = {"write": stage_write, "quantize": stage_quantize, "run": stage_run, "bench": stage_bench}[st](ctx)
        result["stage_s"] = round(time.perf_counter() - t0, 1)
        record(ctx, result)
        tables.append(f"== {st} ({result['stage_s']} s)\n{table(result)}")
    print("\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
