"""What the machine has, measured one way for `lowvram plan` and `lowvram run` alike.

`Machine.detect(device)` reads a CUDA device (free and total memory, name, compute capability) and the
host RAM that is *available* now (psutil), under an optional allocator cap that imitates a smaller card
(`--vram-cap-gib` / `LOWVRAM_VRAM_CAP_GIB`: the CUDA caching allocator refuses memory beyond it, so the
planner must see the cap, not the card). `Machine.described(...)` plans for another machine, and a
machine of `None` fields checks nothing (so does the CPU device: the tiny model's runs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lowvram.constants import GIB
from lowvram.errors import LowvramError

CAP_ENV = "LOWVRAM_VRAM_CAP_GIB"


@dataclass(frozen=True)
class Machine:
    device_type: str = "cuda"  # "cuda" | "cpu": the device the plan places the model on
    free_vram_bytes: int | None = None  # what the plan may use on the device (None: not checked)
    total_vram_bytes: int | None = None
    host_ram_bytes: int | None = None  # host RAM available now (None: not checked)
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None
    vram_cap_gib: float | None = None

    @classmethod
    def detect(cls, device: torch.device, vram_cap_gib: float | None = None) -> "Machine":
        import psutil

        cap = cap_from_env(vram_cap_gib)
        if device.type != "cuda":  # the CPU device: its memory figures are host RAM, and nothing is checked
            return cls("cpu")
        host = psutil.virtual_memory().available
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device)  # this process's own cache (a Session's placed DiT) is its to reuse
        if cap is not None:  # the allocator stops at the cap
            free, total = min(free, int(cap * GIB)), min(total, int(cap * GIB))
        props = torch.cuda.get_device_properties(device)
        return cls("cuda", free, total, host, props.name, (props.major, props.minor), cap)

    @classmethod
    def described(cls, vram_gib: float | None = None, host_ram_gib: float | None = None,
                  device_type: str = "cuda") -> "Machine":
        """Another machine, as given on the command line (`lowvram plan --vram-gib 24 --host-ram-gib 64`)."""
        return cls(device_type, None if vram_gib is None else int(vram_gib * GIB),
                   None if vram_gib is None else int(vram_gib * GIB),
                   None if host_ram_gib is None else int(host_ram_gib * GIB))

    def resident_budget_gib(self) -> float:
        """The VRAM budget of the resident preset: what the device has (a CPU device is not checked)."""
        if self.device_type != "cuda" or self.free_vram_bytes is None:
            return 1024.0
        return max(0.1, math.floor(self.free_vram_bytes / GIB * 10) / 10)


def cap_from_env(vram_cap_gib: float | None) -> float | None:
    """The allocator cap in GiB: the option if given, else LOWVRAM_VRAM_CAP_GIB, else None."""
    if vram_cap_gib is None:
        raw = os.environ.get(CAP_ENV, "").strip()
        if not raw:
            return None
        try:
            vram_cap_gib = float(raw)
        except ValueError:
            raise LowvramError(f"{CAP_ENV}={raw!r} is not a number of GiB; unset it or use e.g. 24") from None
    if not (vram_cap_gib > 0 and math.isfinite(vram_cap_gib)):
        raise LowvramError(f"the VRAM cap must be a positive number of GiB, got {vram_cap_gib}; use e.g. 24")
    return float(vram_cap_gib)


def apply_vram_cap(device: torch.device, vram_cap_gib: float | None) -> float | None:
    """Cap the CUDA caching allocator of `device` at vram_cap_gib (imitating a smaller card); returns the cap.

    The cap is a fraction of the card's total memory (torch.cuda.set_per_process_memory_fraction): the
    allocator raises OutOfMemoryError past it exactly as on a card of that size. NVML still sees the
    CUDA context beside it. Without a cap the whole card is the allocator's again; a no-op on the CPU."""
    cap = cap_from_env(vram_cap_gib)
    if device.type != "cuda":
        return cap
    if cap is None:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if cap * GIB > total:
        raise LowvramError(f"--vram-cap-gib {cap:g} is more than the GPU's {total / GIB:.1f} GiB; use a smaller cap")
    torch.cuda.set_per_process_memory_fraction(cap * GIB / total, device)
    return cap
