"""`QuantLinear`: an 8-bit Linear held in plain buffers, the weight quantizer, and the module swap.

Weights are quantized per output channel (one fp32 scale per row of W [out, in]) by kernels/rowquant.py,
the rule of every 8-bit tensor of the engine:
    int8: scale = absmax / 127, q = W * (1 / scale) clamped to [-127, 127], rounded (ties to even)
    fp8:  scale = absmax / 448, q = float8_e4m3fn(W * (1 / scale))
The buffers (`qweight`, `scale`, `bias`) are ordinary tensors, so offload hooks, pinning and `record_stream`
treat them like any parameter. The matmul is one of `backends.py`'s, chosen per module: `QuantLinear.backend`
("auto" unless `set_gemm_backend(model, name)` set it; no process-wide choice).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lowvram.errors import LowvramError
from lowvram.kernels.rowquant import QuantRows, quantize_rows_fp8, quantize_rows_int8
from lowvram.metrics import power_ratio_db
from lowvram.quantize.backends import available_backends, check_backend, resolve

SCHEMES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

__all__ = ["SCHEMES", "QuantLinear", "apply_quant_layers", "available_backends", "quantize_weight",
           "set_gemm_backend", "weight_sqnr_db", "quantize_weight_sqnr", "check_scheme"]


def check_scheme(scheme: str) -> torch.dtype:
    """The storage dtype of a scheme; LowvramError for an unknown one."""
    if scheme not in SCHEMES:
        raise LowvramError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


CHUNK = 1 << 22  # elements per row block: bounds the fp32 temporaries of big weights to 16 MB


def row_blocks(rows: int, cols: int, chunk: int = CHUNK):
    """Row slices of about `chunk` elements each."""
    step = max(1, chunk // max(cols, 1))
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (qweight [out, in] int8 or float8_e4m3fn, scale [out] fp32), computed in fp32.

    Works through blocks of rows, so a 70 M-element weight needs only 16 MB of fp32 scratch.
    """
    q, scale, _ = _quantize(w, scheme, measure=False)
    return q, scale


@torch.no_grad()
def quantize_weight_sqnr(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """quantize_weight plus the weight's SQNR in dB (= weight_sqnr_db), in the same pass over W."""
    return _quantize(w, scheme, measure=True)


def _quantize(w: torch.Tensor, scheme: str, measure: bool):
    dtype = check_scheme(scheme)
    if w.ndim != 2:
        raise ValueError(f"quantize_weight needs a 2-D weight, got shape {list(w.shape)}")
    quantize_rows = quantize_rows_int8 if scheme == "int8" else quantize_rows_fp8
    q = torch.empty(w.shape, dtype=dtype, device=w.device)  # [out, in]
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)  # [out]
    signal = noise = 0.0
    for rows in row_blocks(*w.shape):
        q[rows], s = quantize_rows(w[rows])  # [rows, in], [rows]
        scale[rows] = s
        if measure:
            ref = w[rows].float()
            approx = q[rows].float().mul_(s[:, None])
            signal += torch.linalg.vector_norm(ref).item() ** 2
            noise += torch.linalg.vector_norm(approx.sub_(ref)).item() ** 2
    return q, scale, (power_ratio_db(signal, noise) if measure else None)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """qweight [out, in], scale [out] -> W [out, in] in dtype (computed in fp32)."""
    return (qweight.float() * scale.float()[:, None]).to(dtype)


def weight_sqnr_db(w: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> float:
    """metrics.sqnr_db(w, dequantize_weight(qweight, scale)) without materialising the dequantized weight."""
    signal = noise = 0.0
    for rows in row_blocks(*w.shape):
        ref = w[rows].float()
        signal += torch.linalg.vector_norm(ref).item() ** 2
        noise += torch.linalg.vector_norm(ref - qweight[rows].float() * scale[rows, None]).item() ** 2
    return power_ratio_db(signal, noise)


class QuantLinear(nn.Module):
    """y = x @ (qweight · scale).T + bias with an 8-bit weight; x [..., in] -> y [..., out] in x.dtype.

    `backend`: the matmul backend of this module ("auto" or a name of backends.available_backends(); a plain
    attribute, not a buffer: set_gemm_backend sets it on a whole model)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "int8",
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        qdtype = check_scheme(scheme)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.backend = "auto"

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

    def forward(self, x: torch.Tensor | QuantRows, backend: str | None = None) -> torch.Tensor:
        """x: [..., in], or a rowquant.QuantRows of such an x (its 8-bit copy shared with other layers, in this
        layer's scheme: the backend must be a W8A8 one, see lowvram.quantize.fuse) -> [..., out].
        backend: this call's matmul backend instead of self.backend (tests, benchmarks)."""
        if isinstance(x, QuantRows):
            mm = resolve(x.q, self.qweight, backend or self.backend)
            if mm.quantized is None or x.scheme != self.scheme:
                raise ValueError(f"{x.scheme} quantized rows cannot feed a {self.scheme} layer on the {mm.name} "
                                 "backend; pass the activation itself (quantize.fuse.input_scheme says when)")
            y = mm.quantized(x.q, x.scale, self.qweight, self.scale, self.bias, x.dtype)  # [M, out]
            return y.reshape(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        y = resolve(x2, self.qweight, backend or self.backend).fn(x2, self.qweight, self.scale, self.bias)  # [M, out]
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}, backend={self.backend}")


def set_gemm_backend(model: nn.Module, name: str) -> int:
    """Set the matmul backend of every QuantLinear of `model` (itself included) to `name`: "auto" or one of
    backends.available_backends(); a one-line LowvramError listing the choices otherwise, before any change.
    Returns how many modules were set; other models keep theirs."""
    check_backend(name)
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.backend = name
            count += 1
    return count


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
