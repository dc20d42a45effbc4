"""The queue's worker thread: queued jobs run one at a time, in submission order, through one runner.

Each job runs through lowvram.jobs.execute (partial name, rename, sidecar) into its folder; after every
block its progress (blocks, frames, ETA inputs, peak and current VRAM) is written to its job.json and
the preview thread is fed the growing file. `cancel` of the running job finishes the block in flight
and keeps the playable partial video (status interrupted); of a queued job, removes it (cancelled).
`shutdown` stops the running job the same way, so a restarted server finds it interrupted.
"""

from __future__ import annotations

import threading
import time
import traceback

from lowvram.jobs.execute import execute
from lowvram.jobs.model import CANCELLED, FAILED, INTERRUPTED, QUEUED, RUNNING
from lowvram.jobs.options import options_from_json
from lowvram.jobs.preview import PreviewMaker, first_frame


def _vram_now() -> int:
    import torch

    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0


class _Progress:
    """The runner's progress sink: the plan's headline and the block total, as soon as the run knows them."""

    def __init__(self, store, job_id):
        self.store, self.job_id = store, job_id

    def start(self, total_blocks, clips, headline):
        job = self.store.get(self.job_id)
        self.store.update(self.job_id, headline=headline,
                          progress={**job.progress, "blocks_total": total_blocks, "clips": clips, "blocks_done": 0})

    def block_done(self, *a):
        pass

    def finish(self):
        pass


class Worker:
    def __init__(self, store, runner, model_options: dict, log=print):
        self.store, self.runner, self.model_options, self.log = store, runner, dict(model_options), log
        self.current: str | None = None
        self._wake = threading.Event()
        self._stop_current = threading.Event()
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lowvram-queue", daemon=True)

    def start(self) -> "Worker":
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> str:
        """One line for the page: what Cancel did."""
        job = self.store.get(job_id)
        if job is None:
            return f"no job {job_id}"
        if job.status == QUEUED:
            self.store.update(job.id, status=CANCELLED, finished=time.time(), error="cancelled before it ran")
            return f"job {job.id} removed from the queue"
        if job.status == RUNNING and job.id == self.current:
            self.store.update(job.id, cancel_requested=True)
            self._stop_current.set()
            return f"job {job.id}: stopping after the block in flight; the partial video is kept"
        return f"job {job.id} is {job.status}; nothing to cancel"

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Stop the running job at its next block boundary (marked interrupted) and the thread; False if
        it is still running after `timeout` (a run still loading its models): the next start marks it."""
        self._quit.set()
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def options(self, job):
        """RunOptions of a job: the server's model options + the job's settings, files in its folder."""
        s = dict(job.settings)
        folder = self.store.folder(job.id)
        for key in ("image", "audio"):
            s[key] = str(folder / s[key])
        s["out"] = str(folder / "video.mp4")
        return options_from_json({**self.model_options, **s})

    def _loop(self):
        while not self._quit.is_set():
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as e:  # the queue must keep serving; execute() already catches the run itself
                traceback.print_exc()
                self.store.update(job.id, status=FAILED, finished=time.time(), error=f"{type(e).__name__}: {e}")
            finally:
                self.current = None

    def _run(self, job):
        self.current = job.id
        self._stop_current.clear()
        opts = self.options(job)
        self.store.update(job.id, status=RUNNING, started=time.time(), progress={"blocks_done": 0})
        self.log(f"job {job.id}: started")
        folder = self.store.folder(job.id)
        preview = PreviewMaker(folder / "preview",
                               lambda path, n: self.store.update(job.id, preview=str(path.relative_to(folder))))

        def on_block(ev):
            p = self.store.get(job.id).progress
            self.store.update(job.id, progress={**p, "blocks_done": ev.blocks_done, "blocks_total": ev.blocks_total,
                                                "frames": ev.frames, "seconds": ev.seconds,
                                                "peak_vram": ev.peak_vram_bytes, "vram_now": _vram_now()})
            preview.feed(ev.path)

        def on_start(path):
            self.store.update(job.id, video=path.name)

        oc = execute(self.runner, opts, progress=_Progress(self.store, job.id), on_block=on_block,
                     should_stop=lambda: self._stop_current.is_set() or self._quit.is_set(), on_start=on_start)
        preview.close(final=oc.file)
        thumb = first_frame(oc.file, folder / "thumb.png") if oc.file is not None else None
        why = None
        if oc.status == INTERRUPTED:
            why = "cancelled" if self._stop_current.is_set() else "the server stopped"
            why += f" after {oc.result.blocks} of {self.store.get(job.id).progress.get('blocks_total', '?')} blocks"
        self.store.update(job.id, status=oc.status, finished=time.time(), error=oc.error or why,
                          video=oc.file.name if oc.file is not None else None,
                          thumb=thumb.name if thumb is not None else None,
                          headline=(oc.side or {}).get("headline") or self.store.get(job.id).headline,
                          result=(oc.side or {}).get("result"))
        self.log(f"job {job.id}: {oc.status}" + (f" ({oc.error or why})" if oc.error or why else ""))
