"""One check of the per-row 8-bit quantizer on a GPU: every Triton path against the torch functions, bit for bit.

For INT8 and FP8, on tricky_rows (exact rounding ties, an all-zero row, a row below the scale floor, -0.0; from
tests/test_kernels_rowquant.py) and on realistic activations (randn with 3 outlier channels x20, 3168 x 5120
and 333 x 5120), it runs gemm.quantize_rows (rows read once, and in two passes) and rowquant.quantize_tile
(the 8-bit attention's Q tiles, on the first 128 columns) and reports the fraction of codes and scales that
differ from the torch functions on the same device. Alongside: the torch functions on this device against
the same on the CPU (they must agree), the former torch formula (amax divided by a Python number, which CUDA
turns into amax * fl(1 / QMAX)) against the kernels, and the fraction of elements whose y = x * (1 / scale)
lies within one fp32 ulp of a rounding boundary (the only elements a one-ulp difference anywhere can flip).
For the first mismatches of each case it prints x, both scales, y under each scale (fp32 hex) and both codes.

    python3 tools/check_rowquant_gpu.py          # on the GPU: a few seconds
    python3 tools/check_rowquant_gpu.py --cpu    # Triton's interpreter on the CPU, fewer rows: ~1 minute
Writes check_rowquant_gpu.json under --out (default $OUT or the working directory), prints a table last,
and exits 1 when any code or scale differs.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOW = 4  # mismatches printed per case


def hexf(v: float) -> str:
    """fp32 bits of v, as 0x3f800000."""
    return "0x" + struct.pack(">f", v).hex()


def old_formula(x, qmax: float, fp8: bool):
    """The torch functions as they were: amax / qmax with a Python-number divisor (a * fl(1 / qmax) on CUDA)."""
    import torch

    from lowvram.kernels import rowquant as RQ

    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / qmax).clamp_min(RQ.SCALE_FLOOR)
    y = (xf * scale.reciprocal().unsqueeze(-1)).clamp_(-qmax, qmax)
    return (y.to(torch.float8_e4m3fn) if fp8 else y.round_().to(torch.int8)), scale


def boundary_ulps(y, fp8: bool):
    """|y - nearest rounding boundary| in fp32 ulps of y (float64 math, exact): < 1 means a one-ulp change flips it."""
    import torch

    a = y.double().abs()
    binade = lambda t: torch.frexp(t)[1].double() - 1  # noqa: E731  floor(log2 t), exactly
    # e4m3 steps by 2^(e - 3) in binade e >= -6 (its subnormals like e = -6); INT8 by 1
    step = torch.exp2(binade(a.clamp_min(2.0 ** -6)) - 3) if fp8 else torch.ones_like(a)
    mid = (torch.floor(a / step) + 0.5) * step
    ulp = torch.exp2(binade(a.clamp_min(2.0 ** -126)) - 23)
    return ((a - mid).abs() / ulp).float()


def compare(name, x, fp8: bool, path: str, q, s, qr, sr) -> dict:
    """Codes and scales of one Triton path (q, s) against torch's (qr, sr) on the same device, with examples."""
    import torch

    from lowvram.kernels import rowquant as RQ

    qmax = RQ.FP8_MAX if fp8 else RQ.INT8_MAX
    bad = q.view(torch.uint8) != qr.view(torch.uint8)  # [M, K]
    rows_bad = s != sr
    rec = dict(input=name, fmt="fp8" if fp8 else "int8", path=path, shape=list(x.shape),
               codes_differ=bad.float().mean().item(), n_codes_differ=int(bad.sum()),
               scales_differ=rows_bad.float().mean().item(), n_scales_differ=int(rows_bad.sum()), examples=[])
    if bad.any():
        y_dev, _ = RQ._scaled(x, qmax)  # what the torch function computed on this device
        rows, cols = bad.nonzero(as_tuple=True)
        for r, c in zip(rows[:SHOW].tolist(), cols[:SHOW].tolist()):
            xv = x[r, c].float()
            inv_k, inv_t = (1 / s[r].double()).float(), (1 / sr[r].double()).float()  # fp32 1 / scale, exact rounding
            y_k = (xv.double() * inv_k.double()).float().clamp(-qmax, qmax)
            y_t = (xv.double() * inv_t.double()).float().clamp(-qmax, qmax)
            rec["examples"].append(dict(
                row=r, col=c, x=xv.item(), x_hex=hexf(xv.item()),
                scale_kernel=hexf(s[r].item()), scale_torch=hexf(sr[r].item()),
                y_kernel_scale=hexf(y_k.item()), y_torch_scale=hexf(y_t.item()),
                y_torch_device=hexf(y_dev[r, c].item()), y_ulps_from_boundary=boundary_ulps(y_t.reshape(1), fp8).item(),
                code_kernel=q[r, c].float().item(), code_torch=qr[r, c].float().item()))
    return rec


def run_cases(device: str, shapes: dict) -> tuple[list[dict], list[dict]]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernels_rowquant import activations, tile_quantize, tricky_rows

    from lowvram.kernels import gemm
    from lowvram.kernels import rowquant as RQ

    cases, torch_rows = [], []
    for fp8 in (False, True):
        quantize = RQ.quantize_rows_fp8 if fp8 else RQ.quantize_rows_int8
        qmax = RQ.FP8_MAX if fp8 else RQ.INT8_MAX
        inputs = [(f"tricky_rows {shapes['tricky'][0]}x{shapes['tricky'][1]}", tricky_rows(3, *shapes["tricky"], fp8, device)),
                  *[(f"activations {m}x{k}", activations(4 + m, m, k, device)) for m, k in shapes["acts"]]]
        for name, x in inputs:
            qr, sr = quantize(x)
            qc, sc = quantize(x.cpu())
            qo, so = old_formula(x, qmax, fp8)
            y, _ = RQ._scaled(x, qmax)
            near = (boundary_ulps(y, fp8) < 1.0).float().mean().item()
            q1, s1 = gemm.quantize_rows(x, fp8=fp8, single=True)
            torch_rows.append(dict(
                input=name, fmt="fp8" if fp8 else "int8",
                torch_dev_vs_cpu_codes=(qr.cpu().view(torch.uint8) != qc.view(torch.uint8)).float().mean().item(),
                torch_dev_vs_cpu_scales=(sr.cpu() != sc).float().mean().item(),
                old_formula_vs_kernel_codes=(qo.view(torch.uint8) != q1.view(torch.uint8)).float().mean().item(),
                old_formula_vs_kernel_scales=(so != s1).float().mean().item(),
                within_1ulp_of_boundary=near))
            for path in ("single", "two-pass"):
                q, s = (q1, s1) if path == "single" else gemm.quantize_rows(x, fp8=fp8, single=False)
                cases.append(compare(name, x, fp8, path, q, s, qr, sr))
            xt = x[:, :128].contiguous()
            q, s = tile_quantize(xt, fp8)
            qt, st = quantize(xt)
            cases.append(compare(name, xt, fp8, "tile[:, :128]", q, s, qt, st))
    return cases, torch_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the kernels in Triton's interpreter on the CPU (fewer rows)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for check_rowquant_gpu.json")
    args = ap.parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import triton

    if not args.cpu and not torch.cuda.is_available():
        print("check_rowquant_gpu: no CUDA GPU here; run with --cpu for Triton's interpreter", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    shapes = dict(tricky=(37, 5120), acts=[(48, 5120), (7, 5120)]) if args.cpu else \
        dict(tricky=(333, 5120), acts=[(3168, 5120), (333, 5120)])
    t0 = time.time()
    cases, torch_rows = run_cases(device, shapes)
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=triton.__version__, seconds=round(time.time() - t0, 1))
    out = Path(args.out) / "check_rowquant_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, torch=torch_rows, cases=cases), indent=1))

    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['seconds']} s")
    for c in cases:
        for e in c["examples"]:
            print(f"  {c['fmt']} {c['path']} {c['input']} [{e['row']}, {e['col']}]: x {e['x']!r} ({e['x_hex']}), "
                  f"scale kernel {e['scale_kernel']} torch {e['scale_torch']}, y = x * (1 / scale) with each: "
                  f"{e['y_kernel_scale']} | {e['y_torch_scale']} (torch's own: {e['y_torch_device']}; "
                  f"{e['y_ulps_from_boundary']:.2f} ulp from a boundary), "
                  f"code kernel {e['code_kernel']} torch {e['code_torch']}")
    print("\ntorch on this device vs the CPU, and the former formula (Python-number divisor) vs the kernel:")
    print(f"{'fmt':5} {'input':24} {'codes dev/cpu':>14} {'scales dev/cpu':>15} {'codes old/kern':>15} "
          f"{'scales old/kern':>16} {'y <1ulp of tie':>15}")
    for r in torch_rows:
        print(f"{r['fmt']:5} {r['input']:24} {r['torch_dev_vs_cpu_codes']:14.3e} {r['torch_dev_vs_cpu_scales']:15.3e} "
              f"{r['old_formula_vs_kernel_codes']:15.3e} {r['old_formula_vs_kernel_scales']:16.3e} "
              f"{r['within_1ulp_of_boundary']:15.3e}")
    print("\nkernels vs the torch functions on the same device (fractions that differ):")
    print(f"{'fmt':5} {'path':14} {'input':24} {'codes':>10} {'scales':>10}")
    for c in cases:
        print(f"{c['fmt']:5} {c['path']:14} {c['input']:24} {c['codes_differ']:10.3e} {c['scales_differ']:10.3e}")
    same = all(c["n_codes_differ"] == 0 and c["n_scales_differ"] == 0 for c in cases) and \
        all(r["torch_dev_vs_cpu_codes"] == 0 and r["torch_dev_vs_cpu_scales"] == 0 for r in torch_rows)
    print(f"\n{'ALL BIT-IDENTICAL' if same else 'DIFFERENCES FOUND'} (json: {out})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
