"""What the page shows, from the store: pure functions of jobs (tested without a browser)."""

from __future__ import annotations

import html
import time

from lowvram.constants import GIB
from lowvram.jobs.model import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING

QUEUE_HEADERS = ["job", "status", "prompt", "submitted", "note"]
GALLERY_STATUSES = (DONE, INTERRUPTED)


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def eta_seconds(progress: dict) -> float | None:
    done, total, secs = progress.get("blocks_done", 0), progress.get("blocks_total", 0), progress.get("seconds")
    if not done or not total or secs is None:
        return None
    return secs / done * (total - done)


def status_html(job, queued: int, on_cuda: bool) -> str:
    """The "now" panel: the running job's progress per block with ETA and VRAM, or the idle line."""
    if job is None:
        waiting = f"{queued} job(s) waiting" if queued else "nothing queued"
        return f"<div class='lv-status'><b>Idle</b> · {waiting}. Submit a portrait and a voice to start.</div>"
    p = job.progress or {}
    done, total = p.get("blocks_done", 0), p.get("blocks_total", 0)
    head = f"<b>Job {html.escape(job.id)}</b> · {html.escape(job.settings.get('prompt', ''))[:80]}"
    if not total:
        body = "loading the models and encoding the inputs…"
        bar = "<progress></progress>"
    else:
        fps = p.get("frames", 0) / p["seconds"] if p.get("seconds") else 0.0
        eta = eta_seconds(p)
        body = (f"block {done}/{total} · {p.get('frames', 0)} frames · {fps:.2f} FPS · "
                f"ETA {_duration(eta) if eta is not None else '…'}")
        bar = f"<progress value='{done}' max='{total}'></progress>"
    if on_cuda:
        vram = f"VRAM {p.get('vram_now', 0) / GIB:.1f} GiB now, peak {p.get('peak_vram', 0) / GIB:.1f} GiB"
    else:
        vram = "running on the CPU (no VRAM)"
    stopping = " · <b>stopping after this block</b>" if job.cancel_requested else ""
    plan = f"<div class='lv-plan'>{html.escape(job.headline)}</div>" if job.headline else ""
    more = f" · {queued} more waiting" if queued else ""
    return (f"<div class='lv-status'>{head}<br>{bar}<br>{body}{stopping}<br>{vram}{more}{plan}</div>")


def note(job) -> str:
    if job.status == RUNNING:
        p = job.progress or {}
        if not p.get("blocks_total"):
            return "loading the models"
        return f"block {p.get('blocks_done', 0)}/{p['blocks_total']}"
    if job.status in (FAILED, INTERRUPTED, CANCELLED):
        return job.error or ""
    if job.status == DONE and job.result:
        r = job.result
        return f"{r.get('frames')} frames in {r.get('seconds', 0):.1f} s"
    return ""


def queue_rows(jobs) -> list[list[str]]:
    """Running first, then the queue in order, then the last finished jobs without a video (failed,
    cancelled); the ones with a video are the gallery."""
    running = [j for j in jobs if j.status == RUNNING]
    queued = [j for j in jobs if j.status == QUEUED]
    rest = [j for j in reversed(jobs) if j.status in (FAILED, CANCELLED)
            or (j.status in GALLERY_STATUSES and not (j.video and j.thumb))][:20]
    return [[j.id, j.status, j.settings.get("prompt", "")[:60], _clock(j.created), note(j)]
            for j in running + queued + rest]


def gallery_jobs(jobs) -> list:
    """Finished jobs with a video (and its picture), newest first."""
    return [j for j in reversed(jobs) if j.status in GALLERY_STATUSES and j.video and j.thumb]


def caption(job) -> str:
    tag = "" if job.status == DONE else f"[{job.status}] "
    return f"{tag}{job.settings.get('prompt', '')[:32]} · {job.id}"


def detail(job, store) -> dict:
    """The job panel's JSON: settings, status, times, result, sidecar."""
    from lowvram.jobs.sidecar import read_json

    d = {"id": job.id, "status": job.status, "settings": job.settings, "submitted": _clock(job.created),
         "started": _clock(job.started), "finished": _clock(job.finished), "headline": job.headline,
         "error": job.error, "result": job.result, "rerun_of": job.rerun_of}
    side = read_json(store.folder(job.id) / "video.json")
    if side is not None:
        d["sidecar"] = side
    return d
