"""cuDNN's FP8 flash attention on Hopper, through NVIDIA's cudnn-frontend (`pip install nvidia-cudnn-frontend`).

A candidate for the self-attention of the all-resident profiles on sm_90 (issue 15: an 8-bit attention that
beats cuDNN's bf16), measured beside cuDNN bf16 and our kernels by `tools/bench_kernels.py --only attention`.

Algorithm (`fp8_sdpa`): per-tensor e4m3 scaling, the one cuDNN's FP8 SDPA forward takes on Hopper:
- K is smoothed first: its mean over the keys (per batch, head, channel) is subtracted, which adds one
  constant per query row to the scores and so leaves the softmax exact, while the outlier channels of real
  keys no longer set the per-tensor scale. Q, smoothed K and V are divided by amax / 448 and cast to e4m3.
- cuDNN computes S = Q8 K8^T * descale_q * descale_k / sqrt(D), P = softmax(S) cast to e4m3 after a
  multiply by scale_s = 448 (P is in [0, 1]), O = P8 V8 * descale_s * descale_v, and writes O * scale_o in
  e4m3 (Hopper has no bf16 output here). O is a convex combination of V's rows, so |O| <= amax(V) and
  scale_o = 448 / amax(V) cannot overflow; O comes back as bf16 times amax(V) / 448.
Limits: CUDA sm_90 (cuDNN 9 with FP8 SDPA), D a multiple of 16 up to 128 (here 128), no mask. One graph
per shape, built on first use (about a second) and cached. `fp8_sdpa_quantized` takes pre-quantized inputs
(the kernel alone); `quantize_qkv` is the per-call quantization that a bf16 KV cache needs.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
_GRAPHS: dict = {}
_HANDLES: dict = {}


def unavailable(device: torch.device | str = "cuda") -> str | None:
    """Why fp8_sdpa cannot run on `device` (None when it can)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "cuDNN's FP8 attention needs sm_90 or later"
    try:
        import cudnn  # noqa: F401  (nvidia-cudnn-frontend)
    except (ImportError, OSError) as e:
        return f"nvidia-cudnn-frontend is not importable ({type(e).__name__}: {e}); pip install nvidia-cudnn-frontend"
    return None


def _to_e4m3(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / (amax / 448) in e4m3, and that scale as a [1, 1, 1, 1] fp32 tensor (amax: a 0-dim fp32 tensor)."""
    scale = (amax.float().clamp_min(1e-12) / FP8_MAX).reshape(1, 1, 1, 1)
    return (x.float() / scale.view(1)).to(torch.float8_e4m3fn), scale


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """q [B, Lq, H, D], k / v [B, Lk, H, D] bf16 -> e4m3 tensors of the same layout and their scales."""
    ks = k - k.float().mean(dim=1, keepdim=True).to(k.dtype)  # smoothing: exact for the softmax
    out = {}
    for name, t in (("q", q), ("k", ks), ("v", v)):
        out[name], out["s" + name] = _to_e4m3(t, t.abs().amax())
    return out


def _handle(device: torch.device):
    import cudnn

    if device.index not in _HANDLES:
        _HANDLES[device.index] = cudnn.create_handle()
    return _HANDLES[device.index]


def _bhsd(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """dims and strides of a [B, L, H, D] tensor seen as cuDNN's [B, H, L, D]."""
    b, s, h, d = t.shape
    st = t.stride()
    return [b, h, s, d], [st[0], st[2], st[1], st[3]]


def _graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor):
    import cudnn

    key = (q8.device.index, tuple(q8.shape), q8.stride(), tuple(k8.shape), k8.stride(), v8.stride())
    if key in _GRAPHS:
        return _GRAPHS[key]
    handle = _handle(q8.device)
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    tq, tk, tv = (g.tensor(name=n, dim=_bhsd(t)[0], stride=_bhsd(t)[1], data_type=e4m3)
                  for n, t in (("q", q8), ("k", k8), ("v", v8)))
    scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
    names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    sc = {n: g.tensor(name=n, **scalar) for n in names}
    o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, **sc, is_inference=True,
                                      attn_scale=1.0 / math.sqrt(q8.shape[-1]), use_causal_mask=False, name="sdpa")
    b, lq, h, d = q8.shape
    o.set_output(True).set_dim([b, h, lq, d]).set_stride([lq * h * d, d, h * d, 1]).set_data_type(e4m3)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(g.get_workspace_size(), device=q8.device, dtype=torch.uint8)
    _GRAPHS[key] = (g, (tq, tk, tv), sc, (o, amax_s, amax_o), ws, handle)
    return _GRAPHS[key]


def fp8_sdpa_quantized(q8, k8, v8, sq, sk, sv, so=None, amax_o=None) -> torch.Tensor:
    """Attention of e4m3 q8 [B, Lq, H, D] against k8 / v8 [B, Lk, H, D] with their fp32 [1, 1, 1, 1] scales
    (value = e4m3 * scale); bf16 [B, Lq, H, D] out. so: the output's scale (default sv: |O| <= amax(V) =
    448 sv, never overflows, but an average of many rows is far smaller than amax(V) and lands in e4m3's
    subnormals); a calibrated one is amax(O) / 448 from an earlier call, whose amax cuDNN writes into
    `amax_o` ([1, 1, 1, 1] fp32) when given (delayed scaling)."""
    import cudnn

    g, (tq, tk, tv), sc, (o, t_amax_s, t_amax_o), ws, handle = _graph(q8, k8, v8)
    dev = q8.device
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(dev).cuda_stream)
    out8 = torch.empty(q8.shape, device=dev, dtype=torch.float8_e4m3fn)  # [B, Lq, H, D], strides as set above
    so = sv if so is None else so
    one = torch.ones(1, 1, 1, 1, device=dev, dtype=torch.float32)
    pack = {tq: q8, tk: k8, tv: v8, sc["descale_q"]: sq, sc["descale_k"]: sk, sc["descale_v"]: sv,
            sc["descale_s"]: one / FP8_MAX, sc["scale_s"]: one * FP8_MAX, sc["scale_o"]: so.reciprocal(),
            o: out8, t_amax_s: torch.empty_like(one), t_amax_o: amax_o if amax_o is not None else torch.empty_like(one)}
    g.execute(pack, ws, handle=handle)
    return (out8.float() * so.view(1)).to(torch.bfloat16)


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Lq, H, D], k / v [B, Lk, H, D] bf16 -> bf16 [B, Lq, H, D]: quantize_qkv then the cuDNN kernel."""
    x = quantize_qkv(q, k, v)
    return fp8_sdpa_quantized(x["q"], x["k"], x["v"], x["sq"], x["sk"], x["sv"])
