"""The JSON sidecar beside each output, `<out stem>.json` (`me.mp4` -> `me.json`), and what "complete" means.

    {"format": "lowvram-job", "version": 1,
     "status": "running" | "done" | "interrupted" | "failed",
     "file": "me.mp4",                  # the mp4 holding the video (`me.partial.mp4` unless done), or null
     "bytes": 1234567,                  # its size when done
     "inputs": {"image": {"file": ..., "sha256": ...}, "audio": {...}},
     "settings": {...},                 # lowvram.jobs.options.CONTENT: what decides the pixels
     "options": {...},                  # every RunOptions field
     "seed": 420, "headline": "...",    # the plan's headline as the run printed it
     "result": {"frames", "clips", "blocks", "seconds", "fps", "peak_vram", "interrupted", "plan"},
     "error": null, "started": "...", "finished": "..."}

An output is complete when its sidecar says done, the final mp4 exists with the recorded size, and the
sidecar's settings and input hashes equal the job's: only then does a rerun skip it. A sidecar that
says running (the process died) or interrupted, or none at all, means the job is done again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from lowvram.jobs.options import CONTENT, options_to_json

FORMAT, VERSION = "lowvram-job", 1


def sidecar_path(out) -> Path:
    return Path(out).with_suffix(".json")


def partial_path(out) -> Path:
    """Where an output is generated before it is complete: `me.mp4` -> `me.partial.mp4`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def write_json(path, data: dict) -> None:
    """Atomic: a temporary file beside `path`, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_sha256(path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def describe(opts) -> dict:
    """The parts of a sidecar that identify the job: inputs (with hashes), settings, options, seed."""
    full = options_to_json(opts)
    return {"inputs": {k: {"file": full[k], "sha256": file_sha256(getattr(opts, k))} for k in ("image", "audio")},
            "settings": {k: full[k] for k in CONTENT}, "options": full, "seed": opts.seed}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new(opts, status: str = "running") -> dict:
    return {"format": FORMAT, "version": VERSION, "status": status, "file": None, "bytes": None,
            **describe(opts), "headline": None, "result": None, "error": None, "started": now(), "finished": None}


def result_json(res) -> dict:
    plan = getattr(res, "plan", None)
    return {"frames": res.frames, "clips": res.clips, "blocks": res.blocks, "seconds": round(res.seconds, 3),
            "fps": round(res.fps, 3), "peak_vram": res.peak_vram, "interrupted": res.interrupted,
            "plan": plan if isinstance(plan, dict) else None}


def is_complete(opts) -> tuple[bool, str]:
    """(complete, why not): see the module docstring."""
    out = Path(opts.out)
    side = read_json(sidecar_path(out))
    if side is None or side.get("format") != FORMAT:
        return False, "no sidecar"
    if side.get("status") != "done":
        return False, f"last run {side.get('status')}"
    if not out.is_file() or out.stat().st_size != side.get("bytes"):
        return False, "output missing or changed"
    want = describe(opts)
    if side.get("settings") != want["settings"] or side.get("inputs") != want["inputs"]:
        return False, "settings or inputs changed"
    return True, ""
