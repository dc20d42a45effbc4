"""Which DiT weights `lowvram quantize` turns into 8 bits (docs/model.md §8.2: the reference's FP8 set).

Quantized: blocks.N.{self_attn,cross_attn}.{q,k,v,o}, blocks.N.ffn.{0,2}, audio_injector.injector.N.{q,k,v,o}
and the AdaLN linears audio_injector.injector_adain_layers.N.linear. Everything else stays as stored (bf16):
patch/cond/text/time embeddings, time_projection, head, casual_audio_encoder, frame_packer,
trainable_cond_mask, norms, modulation vectors and every bias. `keep` adds fnmatch patterns on module names.
"""

from __future__ import annotations

import fnmatch
import re

QUANT_MODULES = re.compile(
    r"^(?:blocks\.\d+\.(?:self_attn|cross_attn)\.[qkvo]"
    r"|blocks\.\d+\.ffn\.[02]"
    r"|audio_injector\.injector\.\d+\.[qkvo]"
    r"|audio_injector\.injector_adain_layers\.\d+\.linear)$"
)


def quantized_module(key: str, shape, keep: tuple[str, ...] = ()) -> str | None:
    """The module name if tensor `key` of `shape` is to be quantized, else None."""
    if not key.endswith(".weight") or len(shape) != 2:
        return None
    mod = key[: -len(".weight")]
    if not QUANT_MODULES.match(mod):
        return None
    if any(fnmatch.fnmatchcase(mod, p) for p in keep):
        return None
    return mod


def natural_key(key: str) -> tuple:
    """Sort key that orders blocks.2 before blocks.10."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in key.split("."))
