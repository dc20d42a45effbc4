"""A web-page job: the per-job settings of `lowvram run` + an id + a status + timestamps + progress.

Its JSON (`<jobs dir>/<id>/job.json`, lowvram.jobs.store) is this dataclass's fields; file fields
(`settings.image`, `settings.audio`, `video`, `preview`, `thumb`) are names inside the job's folder,
so a jobs directory can be moved. The model options (checkpoint, device, ...) are the server's and are
not part of a job; the sidecar beside the video records every option a run used.

Status: queued -> running -> done | failed | interrupted (Cancel, or the server stopped while it ran);
queued -> cancelled (removed before it ran).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field

QUEUED, RUNNING, DONE, FAILED, INTERRUPTED, CANCELLED = "queued", "running", "done", "failed", "interrupted", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, INTERRUPTED, CANCELLED)
FINAL = (DONE, FAILED, INTERRUPTED, CANCELLED)
# the per-job part of RunOptions; `profile` None = everything resident, `num_clip` None = the whole audio
SETTINGS = ("image", "audio", "prompt", "size", "num_clip", "seed", "steps", "profile", "overrides")
VERSION = 1


def new_id() -> str:
    """Sortable by submission time, unique: 20250131-142501-3f9a."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class Job:
    id: str
    settings: dict
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None          # one line (failed), or why it stopped (interrupted)
    headline: str | None = None       # the plan's headline as the run printed it
    progress: dict = field(default_factory=dict)  # blocks_done, blocks_total, frames, seconds, peak_vram, vram_now
    result: dict | None = None        # lowvram.jobs.sidecar.result_json
    video: str | None = None          # the mp4 (final, or the partial file when interrupted)
    preview: str | None = None        # newest preview animation
    thumb: str | None = None
    rerun_of: str | None = None
    cancel_requested: bool = False
    version: int = VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Job":
        names = {f.name for f in dataclasses.fields(cls)}
        job = cls(**{k: v for k, v in d.items() if k in names})
        if job.status not in STATUSES:
            raise ValueError(f"job {job.id}: unknown status {job.status!r}")
        return job
