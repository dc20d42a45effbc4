"""What a pipeline run reports: a RunResult with one entry per rank (`--report` writes it as JSON).

Per rank: its role and plan headline, phases (seconds, allocator peaks), the allocator's and the card's
peak (`peak_device_used`: cudaMemGetInfo's used memory, what NVML reports, sampled every 50 ms), DiT
compute seconds, forwards, seconds it waited on its upstream neighbour's data (`recv_wait_s`: not
counting time its own queued compute still ran) and on its downstream neighbour taking the previous
message (`send_wait_s`), bytes sent and bytes per block.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from lowvram.pipeline.options import RunResult


@dataclass
class ParallelResult(RunResult):
    gpus: int = 1
    ranks: list = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> "ParallelResult":
        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["out"] = Path(kw["out"])
        return cls(**kw)


class DevicePeak:
    """The card's peak used memory (total - free, as NVML counts it: every context on the card), sampled."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()
        self._t = None

    def start(self) -> "DevicePeak":
        if self.device.type == "cuda":
            self._t = threading.Thread(target=self._run, name="lowvram-device-peak", daemon=True)
            self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        return self.peak
