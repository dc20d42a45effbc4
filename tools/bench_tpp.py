"""Timestep-forcing pipeline benchmark: `lowvram run --gpus N` for several N in one call, against --gpus 1.

    python tools/bench_tpp.py --ckpt-dir .full/int8 --profile 4090 --gpus 1,4,5 --cap-gib 24 --out $OUT
    python tools/bench_tpp.py --quick --device cpu        # tiny checkpoint, 64*64, ranks as CPU processes

Each N runs as its own `lowvram run` process (N = 1: the single-GPU path; N > 1: the launcher and its ranks),
every rank's allocator capped at --cap-gib (a 24 GB card), NCCL NVLink multicast off (NCCL_NVLS_ENABLE=0).
Per N: generated FPS over the whole run and in the steady state (after clip 0), VAE decode and writer
included (the writer rank's clock), the ratio to N = 1, time to first frame (from the process start), and
per rank: allocator peak (reserved), the card's peak used memory (NVML, nvidia-smi polled every 0.1 s; on
the CPU none), DiT compute seconds, seconds waiting on the upstream neighbour's block and on the downstream
one taking the previous block, bytes sent per block. The frames of every N are compared with N = 1's
(bit-identical in fp32 on the CPU; on the GPU in bf16: max |diff| and the share of equal pixels, measured).
Writes bench_tpp.json under --out and prints the tables last.

The full-size run needs a quantized checkpoint on the machine: on a fresh GPU machine first
`python tools/user_path.py --stage write` and `--stage quantize --schemes int8` (which make .full/int8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2 ** 30


class NvmlPeaks:
    """Every card's peak memory.used (nvidia-smi, what NVML reports: all contexts on the card)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peaks, self._stop = interval, {}, threading.Event()
        self.ok = subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0

    def _poll(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                i, _, mib = line.partition(",")
                if i.strip().isdigit() and mib.strip().isdigit():
                    self.peaks[int(i)] = max(self.peaks.get(int(i), 0), int(mib) * 2 ** 20)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.ok:
            self._t = threading.Thread(target=self._poll, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def quick_inputs(root: Path) -> dict:
    from lowvram.demo.inputs import synth_portrait, synth_voice
    from lowvram.demo.tiny import write_tiny_checkpoint

    ckpt, lora = write_tiny_checkpoint(root / "tiny")
    synth_portrait(str(root / "face.png"), width=64, height=64, seed=1)
    synth_voice(str(root / "voice.wav"), seconds=3.5, seed=1)
    return {"ckpt_dir": str(ckpt), "lora": str(lora), "image": str(root / "face.png"),
            "audio": str(root / "voice.wav"), "prompt": "a person talking"}


def full_inputs(args, root: Path) -> dict:
    image, audio = args.image, args.audio
    media = Path(".media")  # tools/make_user_inputs.py's portrait and speech, when carried
    if (image is None or audio is None) and (media / "portrait.png").is_file() and (media / "speech.wav").is_file():
        image, audio = str(media / "portrait.png"), str(media / "speech.wav")
    if image is None or audio is None:
        from lowvram.demo.inputs import photo_portrait, speech_wav

        image, audio = str(root / "portrait.png"), str(root / "speech.wav")
        photo_portrait(image, width=720, height=1280)
        speech_wav(audio, min_seconds=3.4 * args.num_clip)
    return {"ckpt_dir": args.ckpt_dir, "lora": args.lora, "image": image, "audio": audio,
            "prompt": "A person talks to the camera in a softly lit room, head and shoulders."}


def run_one(n: int, inp: dict, args, out_dir: Path) -> dict:
    rep, mp4, log = out_dir / f"gpus{n}.json", out_dir / f"gpus{n}.mp4", out_dir / f"gpus{n}.log"
    cmd = [sys.executable, "-m", "lowvram.cli.main", "run", "--ckpt-dir", inp["ckpt_dir"], "--image", inp["image"],
           "--audio", inp["audio"], "--prompt", inp["prompt"], "--size", args.size, "--num-clip", str(args.num_clip),
           "--out", str(mp4), "--device", args.device, "--report", str(rep), "--quiet"]
    cmd += ["--lora", inp["lora"]] if inp.get("lora") else []
    cmd += ["--profile", args.profile] if args.profile else []
    cmd += ["--vram-cap-gib", str(args.cap_gib)] if args.cap_gib and args.device != "cpu" else []
    cmd += ["--gpus", str(n)] if n > 1 else []
    for s in args.sets:
        cmd += ["--set", s]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":  # one thread per process: the CPU kernels' sums then do not depend on N
        env["OMP_NUM_THREADS"] = "1"
    print(f"--gpus {n}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    with NvmlPeaks() as nv, open(log, "w") as lf:
        p = subprocess.run(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, timeout=args.timeout)
    wall = time.time() - t0
    if p.returncode != 0 or not rep.is_file():
        tail = log.read_text().strip().splitlines()[-3:]
        print(f"--gpus {n} failed (exit {p.returncode}): {' | '.join(tail)}", flush=True)
        return {"gpus": n, "ok": False, "exit": p.returncode, "tail": tail, "wall_s": wall}
    r = json.loads(rep.read_text())
    t = r.get("timings", {})
    if n == 1:
        clip_s = t.get("clip_s") or []
        steady = 48 / (sum(clip_s[1:]) / len(clip_s[1:])) if len(clip_s) > 1 else None
        ranks = [{"rank": 0, "role": "everything", "peak_reserved": r["peak_vram"], "dit_s": t.get("dit_s"),
                  "recv_wait_s": 0.0, "send_wait_s": 0.0, "bytes_per_block": 0}]
    else:
        bs = t.get("block_s") or []
        steady = 12 * (len(bs) - 4) / (bs[-1] - bs[3]) if len(bs) > 4 and bs[-1] > bs[3] else None
        ranks = r["ranks"]
    for rk in ranks:
        rk["nvml_peak"] = nv.peaks.get(rk["rank"]) if nv.ok else None
    return {"gpus": n, "ok": True, "frames": r["frames"], "seconds": r["seconds"], "fps": r["fps"],
            "steady_fps": steady, "first_frame_s": t.get("first_frame_s"), "vae_s": t.get("vae_s"),
            "wall_s": wall, "mp4": str(mp4), "ranks": ranks, "plan": r.get("plan")}


def compare(a: str, b: str) -> dict:
    import av
    import numpy as np

    def frames(p):
        with av.open(p) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)

    x, y = frames(a), frames(b)
    if x.shape != y.shape:
        return {"same_shape": False}
    d = np.abs(x - y)
    return {"same_shape": True, "identical": bool((d == 0).all()), "max_abs": int(d.max()),
            "equal_pixels": round(float((d == 0).mean()), 4)}


def _g(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--quick", action="store_true", help="tiny checkpoint at 64*64 (a dry run of the code)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", default=None, help="comma-separated N (default 1,4,5; --quick 1,2,4,5)")
    ap.add_argument("--ckpt-dir", default=".full/int8")
    ap.add_argument("--lora", default=None)
    ap.add_argument("--image", default=None)
    ap.add_argument("--audio", default=None)
    ap.add_argument("--profile", default="4090")
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--num-clip", type=int, default=3)
    ap.add_argument("--cap-gib", type=float, default=24.0, help="every rank's allocator cap (a 24 GB card)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=480)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tpp-"))
    if args.quick:
        args.size, args.num_clip, args.profile = "64*64", 2, None
        inp = quick_inputs(tmp)
    else:
        inp = full_inputs(args, tmp)
    ns = [int(x) for x in (args.gpus or ("1,2,4,5" if args.quick else "1,4,5")).split(",")]
    if 1 not in ns:
        ns = [1] + ns  # the ratio needs the single-GPU run
    rows = [run_one(n, inp, args, out) for n in ns]
    base = next(r for r in rows if r["gpus"] == 1)
    for r in rows:
        if r["ok"] and base["ok"]:
            r["vs_1"] = compare(base["mp4"], r["mp4"])
            r["steady_ratio"] = (r["steady_fps"] / base["steady_fps"]) if r["steady_fps"] and base["steady_fps"] else None
    (out / "bench_tpp.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1, default=str))

    print(f"\nbench_tpp: {args.size}, {args.num_clip} clip(s), profile {args.profile}, device {args.device}, "
          f"cap {args.cap_gib} GiB per rank")
    print(f"{'gpus':>4} {'frames':>6} {'FPS':>7} {'steady':>7} {'x1':>5} {'1st frame s':>11} {'vae s':>6} "
          f"{'vs gpus 1':>22}")
    for r in rows:
        if not r["ok"]:
            print(f"{r['gpus']:>4} failed (exit {r['exit']}): {' | '.join(r['tail'])[:100]}")
            continue
        v = r.get("vs_1", {})
        same = "identical" if v.get("identical") else f"max {v.get('max_abs')} eq {v.get('equal_pixels')}"
        print(f"{r['gpus']:>4} {r['frames']:>6} {r['fps']:>7.2f} {_f(r['steady_fps']):>7} "
              f"{_f(r.get('steady_ratio')):>5} {_f(r['first_frame_s'], '{:.1f}'):>11} {_f(r['vae_s']):>6} {same:>22}")
    print(f"\n{'gpus':>4} {'rank':>4} {'role':<44} {'alloc GiB':>9} {'NVML GiB':>8} {'dit s':>6} "
          f"{'wait up':>7} {'wait dn':>7} {'MB/block':>8}")
    for r in rows:
        for rk in r.get("ranks", []) if r["ok"] else []:
            print(f"{r['gpus']:>4} {rk['rank']:>4} {str(rk.get('role', ''))[:44]:<44} {_g(rk.get('peak_reserved')):>9} "
                  f"{_g(rk.get('nvml_peak')):>8} {_f(rk.get('dit_s')):>6} {_f(rk.get('recv_wait_s')):>7} "
                  f"{_f(rk.get('send_wait_s')):>7} {rk.get('bytes_per_block', 0) / 1e6:>8.2f}")
    print(f"\nJSON: {out / 'bench_tpp.json'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
