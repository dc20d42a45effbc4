"""`QuantLinear`: an 8-bit Linear held in plain buffers, the weight quantizer, and the module swap.

Weights are quantized per output channel (one fp32 scale per row of W [out, in]):
    int8: scale = absmax / 127, q = round(W / scale) clamped to [-127, 127]
    fp8:  scale = absmax / 448, q = float8_e4m3fn(W / scale)
The buffers (`qweight`, `scale`, `bias`) are ordinary tensors, so offload hooks, pinning and `record_stream`
treat them like any parameter. The matmul itself is chosen in `backends.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lowvram.errors import LowvramError
from lowvram.quantize.backends import FP8_MAX, INT8_MAX, TINY, available_backends, get_backend, resolve, set_backend

SCHEMES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

__all__ = ["SCHEMES", "QuantLinear", "apply_quant_layers", "available_backends", "get_backend",
           "quantize_weight", "set_backend", "sqnr_db", "check_scheme"]


def check_scheme(scheme: str) -> torch.dtype:
    """The storage dtype of a scheme; LowvramError for an unknown one."""
    if scheme not in SCHEMES:
        raise LowvramError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (qweight [out, in] int8 or float8_e4m3fn, scale [out] fp32), computed in fp32."""
    dtype = check_scheme(scheme)
    if w.ndim != 2:
        raise ValueError(f"quantize_weight needs a 2-D weight, got shape {list(w.shape)}")
    w32 = w.float()
    absmax = w32.abs().amax(dim=1)  # [out]
    qmax = INT8_MAX if scheme == "int8" else FP8_MAX
    scale = (absmax / qmax).clamp_min(TINY)  # [out]
    x = w32 / scale[:, None]
    if scheme == "int8":
        q = x.round_().clamp_(-INT8_MAX, INT8_MAX).to(dtype)
    else:
        q = x.clamp_(-FP8_MAX, FP8_MAX).to(dtype)
    return q, scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """qweight [out, in], scale [out] -> W [out, in] in dtype (computed in fp32)."""
    return (qweight.float() * scale.float()[:, None]).to(dtype)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Signal-to-quantization-noise ratio 10·log10(Σref² / Σ(ref−approx)²) in dB (inf if equal).

    Sums in float64 over chunks of `chunk` elements, so a 70 M-element weight needs no float64 copy.
    """
    r, a = ref.detach().reshape(-1), approx.detach().reshape(-1)
    if r.shape != a.shape:
        raise ValueError(f"sqnr_db: shapes differ, {list(ref.shape)} vs {list(approx.shape)}")
    signal = noise = 0.0
    for i in range(0, r.numel(), chunk):
        rc = r[i:i + chunk].double()
        signal += rc.square().sum().item()
        noise += (rc - a[i:i + chunk].double()).square().sum().item()
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


class QuantLinear(nn.Module):
    """y = x @ (qweight · scale).T + bias with an 8-bit weight; x [..., in] -> y [..., out] in x.dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "int8",
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        qdtype = check_scheme(scheme)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "QuantLinear":
        """Quantize an existing nn.Linear (its bias keeps its dtype)."""
        bias = linear.bias
        m = cls(linear.in_features, linear.out_features, bias is not None, scheme, device=linear.weight.device,
                bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
        m.qweight, m.scale = quantize_weight(linear.weight, scheme)
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scale, dtype)

    def forward(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        y = resolve(x2, self.qweight, backend).fn(x2, self.qweight, self.scale, self.bias)  # [M, out]
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}")


def apply_quant_layers(model: nn.Module, names: dict[str, str]) -> nn.Module:
    """Replace the nn.Linear modules named in `names` (module name -> scheme) by empty QuantLinear.

    The new buffers live on the Linear's device (meta included) with the right dtypes and shapes, so that
    `model.load_state_dict(sd, assign=True)` can then assign `<name>.qweight`, `<name>.scale`, `<name>.bias`.
    """
    for name, scheme in names.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError:
            raise LowvramError(f"the quantized checkpoint names layer {name!r}, which the model does not have; "
                               "was it converted from another model?") from None
        if not isinstance(old, nn.Linear):
            raise LowvramError(f"layer {name!r} is a {type(old).__name__}, not a Linear; it cannot hold "
                               f"{scheme} weights")
        bias_dtype = old.bias.dtype if old.bias is not None else torch.bfloat16
        setattr(parent, child, QuantLinear(old.in_features, old.out_features, old.bias is not None, scheme,
                                           device=old.weight.device, bias_dtype=bias_dtype))
    return model
