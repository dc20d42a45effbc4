"""The A/B measurements the CPU cannot make, in one device call: the CUDA tests of the unmeasured GPU paths, then
each change against its absence on the same machine, back to back, the same random model.

    python3 tools/gpu_ab.py --out $OUT                        # tests, kvquant, graphs
    python3 tools/gpu_ab.py --out $OUT --parts graphs --clips 3 --attention fa4
    python3 tools/gpu_ab.py --quick --parts kvquant,graphs     # a scaled-down dry run of the code on the CPU
    python3 tools/gpu_ab.py --out $OUT --parts base --base .base   # this tree against an older one, end to end

Parts (each saved to gpu_ab.json as it ends, so a later failure keeps what was measured):
- tests: `pytest -m cuda` of the tests in TESTS (rc and the last lines).
- kvquant: the `4090` profile under its 24 GiB cap, its host INT8 KV conversions in torch (kernels/kvquant.py's
  kernel_usable patched off) against the one-pass Triton kernels; `--clips` timed clips after a warm-up clip.
- graphs: the `h100-80` profile, `cuda_graphs` off, on (which gives up the GPU caches' sink room: torch.cat per
  layer instead) and auto with a 77 GiB budget (graphs and the room), over `--clips` timed clips (3: 9 full ticks,
  the first two the warm-up and the capture, so the steady FPS is the replays' median); the final latents of
  each graphed run compared bit for bit with the eager run's; `--attention` sets the backend of every run (fa4
  where installed).
- base: end to end, `tools/bench.py` of an older tree (`--base DIR`, e.g. `git archive <commit> | tar -x -C .base`
  here, the folder carried to the machine), then of this one, each in a process of its own with the same arguments
  (`--profiles`, default 4090,h100-80; `--clips`, default 1, after a warm-up clip): what the commits between them
  changed together, where no switch can turn a change off.
Prints a table last. Random weights at full size, 704x384, as tools/bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the CUDA tests of what the CPU could not run: the KV kernels, the graphs, the fused kernels' new variants at the
# model's width (gated norm, AdaLayerNorm), the sink room, no host sync in a tick
TESTS = ["tests/test_kernels_kvquant.py", "tests/test_graphs.py", "tests/test_kernels_fused.py",
         "tests/test_quantize_fuse.py", "tests/test_kv_cache.py", "tests/test_sync.py", "tests/test_batched_run.py"]


def run_tests(log) -> dict:
    # from tests/: `python -m` puts its folder on sys.path, and from the checkout's root that folder's kernels/
    # answers transformers 5.x's probe for the Hugging Face `kernels` package (kernels/__init__.py refuses it; the
    # lent GPU's transformers 5.17 then failed 9 tests in their fixtures, 2026-12-08)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", *(Path(t).name for t in TESTS)]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT / "tests", capture_output=True, text=True)
    tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
    log("\n".join(tail))
    return {"command": " ".join(cmd[1:]), "rc": p.returncode, "s": round(time.perf_counter() - t, 1), "tail": tail}


def kvquant_ab(run, clips) -> list[dict]:
    """4090 under its cap: torch conversions, then the kernels (the default). run: bench.guarded_run with the model,
    size, device and log bound."""
    import lowvram.kernels.kvquant as kvquant

    usable, out = kvquant.kernel_usable, []
    try:
        kvquant.kernel_usable = lambda x: False
        out.append(run("4090, KV conversions in torch", "4090", clips)[0])
    finally:
        kvquant.kernel_usable = usable
    out.append(run("4090, KV conversions by kvquant", "4090", clips)[0])
    return out


GRAPH_RUNS = (("off", {"cuda_graphs": "off"}), ("on", {"cuda_graphs": "on"}),
              ("auto, 77 GiB", {"cuda_graphs": "auto", "vram_budget_gib": 77.0}))


def graphs_ab(run, clips, log, attention: str | None) -> tuple[list[dict], dict]:
    """h100-80: eager, then graphed two ways (module docstring); whether each graphed run's final latents are the
    eager run's bits. run: as kvquant_ab's."""
    extra = {"attention": attention} if attention else {}
    runs, finals = [], []
    for name, ov in GRAPH_RUNS:
        r, f = run(f"h100-80{' ' + attention if attention else ''}, cuda_graphs {name}", "h100-80", clips,
                   overrides={**ov, **extra})
        runs.append(r)
        finals.append(f)
    same = {}
    for (name, _), f in zip(GRAPH_RUNS[1:], finals[1:]):
        if finals[0] and f:
            same[name] = {"blocks": len(f), "identical": sum(torch.equal(finals[0][k], f[k]) for k in f),
                          "max_abs_diff": max(float((finals[0][k] - f[k]).abs().max()) for k in f)}
    log(f"graphed vs eager final latents: {same}")
    return runs, same


def base_ab(base: Path, out: Path, profiles: str, clips: int, quick: bool, log) -> list[dict]:
    """tools/bench.py of `base`, then of this tree, in processes of their own with the same arguments; their runs
    labelled "base"/"head" (a failed process: a row with its error)."""
    rows = []
    for tag, tree in (("base", base.resolve()), ("head", ROOT)):
        dest = out / f"bench_{tag}"
        cmd = [sys.executable, "tools/bench.py", "--out", str(dest.resolve()), "--skip-accuracy", "--no-resident",
               "--profiles", profiles, "--clips", str(clips)] + (["--quick"] if quick else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(_package_view(tree, out / f"pkg_{tag}"))] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
        log(f"[{tag}] {' '.join(cmd[1:])} in {tree.name}: rc {p.returncode}, {time.perf_counter() - t:.0f} s")
        (out / f"bench_{tag}.log").write_text(p.stdout + p.stderr)
        try:
            got = json.loads((dest / "bench.json").read_text())["profiles"]
        except (OSError, ValueError, KeyError):
            tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or ["no output"]
            rows.append({"label": f"{tag}: {profiles}", "error": f"rc {p.returncode}: {tail[0]}"})
            continue
        for r in got:
            rows.append({**r, "label": f"{tag}: {r['label']}"})
    return rows


def _package_view(tree: Path, dest: Path) -> Path:
    """A folder whose `lowvram` package is `tree`'s, laid out as pyproject.toml installs it (kernels/, quantize/ and
    profiles/ as lowvram.kernels, ...), by symbolic links: on PYTHONPATH it imports that tree's code instead of the
    installed (editable) one."""
    pkg = dest / "lowvram"
    if pkg.exists():
        shutil.rmtree(dest)
    pkg.mkdir(parents=True)
    for item in (tree / "lowvram").iterdir():
        (pkg / item.name).symlink_to(item.resolve())
    for name in ("kernels", "quantize", "profiles"):
        (pkg / name).symlink_to((tree / name).resolve())
    return dest.resolve()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--parts", default="tests,kvquant,graphs")
    ap.add_argument("--clips", type=int, default=0, help="timed clips (default: kvquant 1, graphs 3)")
    ap.add_argument("--attention", default=None, help="the graphs part's backend for both runs (e.g. fa4)")
    ap.add_argument("--quick", action="store_true", help="a scaled-down dry run on the CPU (no measurement)")
    ap.add_argument("--base", default=None, help="the base part's older tree (a folder with its tools/bench.py)")
    ap.add_argument("--profiles", default="4090,h100-80", help="the base part's profiles")
    args = ap.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("gpu_ab.py measures on a CUDA GPU; there is none here (--quick: a dry run on the CPU)", file=sys.stderr)
        return 2
    dev, hw = (torch.device("cpu"), (16, 16)) if args.quick else (bench.with_index(torch.device("cuda")), (48, 88))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in args.parts.split(",") if p]
    logs = []

    def log(msg):
        print(msg, flush=True)
        logs.append(str(msg))

    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (--quick: not a measurement)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
           "commit": _commit()}

    def save():
        (out / "gpu_ab.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "gpu_ab.log").write_text("\n".join(logs))

    if "tests" in parts:
        res["tests"] = run_tests(log)
        save()
    if "base" in parts:
        if not args.base or not (Path(args.base) / "tools" / "bench.py").is_file():
            print(f"the base part needs --base DIR, a tree with tools/bench.py (got {args.base!r})", file=sys.stderr)
            return 2
        res["base"] = base_ab(Path(args.base), out, args.profiles, args.clips or 1, args.quick, log)
        save()
    runs = [p for p in parts if p in ("kvquant", "graphs")]
    if runs:
        from lowvram.model.config import DiTConfig
        from lowvram.model.vae import VAEConfig, WanVAE

        cfg = DiTConfig.from_dict(bench.QUICK if args.quick else bench.FULL)
        with torch.device(dev):
            vae = WanVAE(VAEConfig(dim=16 if args.quick else 96)).to(torch.bfloat16).eval()
        models = bench.SharedModel(cfg, dev)

        def run(label, name, clips, overrides=None):
            return bench.guarded_run(label, cfg, name, bench.CAPS.get(name), *hw, dev, clips, log, vae=vae,
                                     overrides=overrides, models=models)

        if "kvquant" in runs:
            res["kvquant"] = kvquant_ab(run, args.clips or 1)
            save()
        if "graphs" in runs:
            res["graphs"], res["graphs_identity"] = graphs_ab(run, args.clips or 3, log, args.attention)
            save()
    save()
    print(f"\n{res['device']}, torch {res['torch']}, {res['date']}, commit {res['commit']}")
    if "tests" in res:
        print(f"tests: rc {res['tests']['rc']}: {res['tests']['tail'][-1] if res['tests']['tail'] else ''}")
    print("| run | resident | sink room | s/clip | DiT s/clip | VAE s/clip | FPS | steady FPS | NVML GiB | graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res.get("kvquant", []) + res.get("graphs", []) + res.get("base", []):
        if "error" in r:
            print(f"| {r['label']} | error: {r['error'][:90]} |")
            continue
        print(f"| {r['label']} | {r['resident']}/{r['resident'] + r['streamed']} | {r.get('gpu_kv_sink', '-')} | "
              f"{r['s_per_clip']} | {r['dit_s_per_clip']} | {r['vae_s_per_clip']} | {r['fps']} | "
              f"{r['steady_fps']} | {r['peak_nvml_gib']} | {r.get('graphs') or '-'} |")
    if res.get("graphs_identity"):
        print(f"graphed vs eager final latents: {res['graphs_identity']}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
