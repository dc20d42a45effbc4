"""Self-attention over [the step's KV window ; the sink], with selectable backends.

`sdpa`: ropes the un-roped sink keys in torch, concatenates them after the window and calls
torch SDPA (the reference's path, cuDNN/flash on CUDA). `triton`: the two-segment Triton kernel
reads both segments in place and ropes sink keys in registers (lowvram.kernels.attention).
`triton8`: the step caches hold lowvram.kernels.attention8's 8-bit format (GpuKV8Cache, or a host cache's
kv8 window) and the 8-bit kernel reads the window from it directly (the sink stays bf16 and is roped in the
kernel). `sage` / `fa4`: sdpa's inputs (the window and the roped sink joined in bf16) to SageAttention 2's INT8-QK /
FP8-PV kernels (lowvram.kernels.sage) or FlashAttention 4's exact bf16 kernel (lowvram.kernels.flash4); optional
libraries, LIBRARIES. A profile may also say `auto`: the planner picks one of these by the GPU
(lowvram.runtime.planner.resolve_attention); the model only ever runs a resolved backend.
"""

from __future__ import annotations

import importlib
from enum import Enum

import torch
import torch.nn.functional as F

from lowvram.kernels import fused


class Attention(str, Enum):
    """Self-attention backends; the profile's `attention` field, the model and the CLI's choices all read this."""

    SDPA = "sdpa"
    TRITON = "triton"
    TRITON8 = "triton8"
    SAGE = "sage"
    FA4 = "fa4"
    AUTO = "auto"  # a profile's choice, resolved by the planner from the GPU; never the model's

    def __str__(self) -> str:
        return self.value


BACKENDS = tuple(a.value for a in Attention if a != Attention.AUTO)  # what the model runs
CHOICES = BACKENDS + (Attention.AUTO.value,)  # what a profile, --set attention= and --attention may say
AUTO_HELP = ("auto: triton8 on sm_86/sm_89 GPUs, else sdpa; sage: SageAttention 2, fa4: FlashAttention 4, where "
             "they are installed.")
# the backends that run an optional library on sdpa's inputs: name -> (module of lowvram.kernels, its function)
LIBRARIES = {"sage": ("sage", "sage_attention"), "fa4": ("flash4", "fa4_attention")}
JOINED = (Attention.SDPA.value, *LIBRARIES)  # the backends that read [window; sink] joined in bf16 (sdpa's inputs)


def library_module(backend: str):
    """The lowvram.kernels module wrapping an optional library's attention (its `unavailable(device)` says whether it
    runs; LIBRARIES[backend][1] is the function)."""
    return importlib.import_module(f"lowvram.kernels.{LIBRARIES[backend][0]}")


def sdpa(q, k, v):  # q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def check_backend(backend: str, choices: tuple[str, ...] = BACKENDS) -> None:
    """Refuse a backend that cannot run, or a choice outside `choices` (one line, what to use instead)."""
    from lowvram.errors import LowvramError

    if backend == Attention.AUTO and backend not in choices:
        raise LowvramError("attention 'auto' is resolved by the planner (a plan's attention is the model's); "
                           f"give the model one of {', '.join(BACKENDS)}")
    if backend not in choices:
        raise LowvramError(f"unknown attention backend {backend!r}; use one of {', '.join(choices)}")


def attend_two_segments(q, k_win, v_win, k_sink, v_sink, sink_cos, sink_sin, backend: str = "sdpa", join=None,
                        room=None):
    """Attention of roped q against the roped window keys and the sink keys roped by sink_cos/sink_sin.

    k_win/v_win may be None (the sink prefill attends only to the sink). sink_cos, sink_sin [Ls, D/2]: the
    sink's multipliers (rope.sink_rope_tables of the sink positions), the same in every layer of a forward
    (gathered once by the caller). join(k_sink_roped, v_sink): for sdpa, the window's cache writing the sink
    behind the window in its own buffer (HostKVCache.joined) instead of torch.cat making a copy of both; the
    same keys in the same order, so the same result; None where it cannot. room(Ls, dtype): that buffer's place
    for the roped sink keys (a view, or None), which the RoPE pass then writes directly (join sees them there and
    copies nothing)."""
    if backend in JOINED:
        attend = sdpa
        if backend in LIBRARIES:
            attend = getattr(library_module(backend), LIBRARIES[backend][1])
        out = room(k_sink.shape[1], k_sink.dtype) if room is not None and k_win is not None else None
        ks = fused.rope(k_sink, sink_cos, sink_sin, out=out)  # one pass on the GPU (rope_apply's bits)
        if k_win is None:
            return attend(q, ks, v_sink)
        kv = join(ks, v_sink) if join is not None else None
        if kv is not None:
            return attend(q, *kv)
        return attend(q, torch.cat([k_win, ks], dim=1), torch.cat([v_win, v_sink], dim=1))
    if backend == "triton8" and k_win is not None:  # the window is an 8-bit KV8Cache view (GpuKV8Cache)
        from lowvram.kernels.attention8 import two_segment_attention8

        return two_segment_attention8(q, k_win, k_sink, v_sink, sink_cos, sink_sin)
    if backend in ("triton", "triton8"):  # triton8's sink prefill has no window: the bf16 kernel
        from lowvram.kernels.attention import two_segment_attention

        if k_win is None:
            k_win = q.new_empty(q.shape[0], 0, *q.shape[2:])
            v_win = k_win
        return two_segment_attention(q, k_win, v_win, k_sink, v_sink, sink_cos, sink_sin)
    check_backend(backend)
