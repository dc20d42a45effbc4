"""The web page's persistent queue: one folder per job in the jobs directory.

    <jobs dir>/
      .lock                      held (flock) by the one server that uses the directory
      <id>/job.json              the Job (lowvram.jobs.model), rewritten atomically on every change
      <id>/portrait.png          the uploads, copied in at submission (names keep their extension)
      <id>/voice.wav
      <id>/video.mp4, video.json the output and its sidecar (video.partial.mp4 while it is written)
      <id>/preview/NNNN.webp     the live preview's animations; thumb.png the gallery's picture

On open, every job.json is read back: queued jobs wait again in submission order, finished ones are the
gallery, and a job that was running when the server died is marked interrupted (it can be re-run).
All changes go through `update`, under one lock, and bump `version` (the page redraws when it moves).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from lowvram.errors import LowvramError
from lowvram.jobs.model import INTERRUPTED, QUEUED, RUNNING, Job, new_id
from lowvram.jobs.sidecar import read_json, write_json


class JobStore:
    def __init__(self, root, log=print):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._flock = _lock_dir(self.root)
        self.version = 0
        self.jobs: dict[str, Job] = {}
        for path in sorted(self.root.glob("*/job.json")):
            data = read_json(path)
            try:
                job = Job.from_json(data) if data is not None else None
            except (TypeError, ValueError):
                job = None
            if job is None:
                log(f"jobs: skipping unreadable {path}")
                continue
            self.jobs[job.id] = job
            if job.status == RUNNING:
                self._recover(job)

    def _recover(self, job: Job) -> None:
        """A job that was running when the server died: interrupted, with what its partial file holds."""
        from lowvram.jobs.preview import first_frame

        video = self.path(job.id, job.video)
        thumb = first_frame(video, self.folder(job.id) / "thumb.png") if video is not None and video.is_file() else None
        self.update(job.id, status=INTERRUPTED, finished=job.finished or time.time(),
                    video=job.video if thumb is not None else None, thumb=thumb.name if thumb is not None else None,
                    error="the server stopped while this job ran; re-run it")

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def path(self, job_id: str, name: str | None) -> Path | None:
        """A file of the job's folder by its name in job.json, or None."""
        return None if not name else self.folder(job_id) / name

    def add(self, settings: dict, files: dict, rerun_of: str | None = None) -> Job:
        """A queued job; `files` maps setting names (image, audio) to files copied into its folder."""
        with self._lock:
            job_id = new_id()
            while job_id in self.jobs:
                job_id = new_id()
            folder = self.folder(job_id)
            folder.mkdir()
            settings = dict(settings)
            for key, src in files.items():
                name = ("portrait" if key == "image" else "voice") + Path(src).suffix.lower()
                shutil.copyfile(src, folder / name)
                settings[key] = name
            job = Job(job_id, settings, rerun_of=rerun_of)
            self.jobs[job_id] = job
            self._write(job)
            return job

    def update(self, job_id: str, **fields) -> Job:
        with self._lock:
            job = self.jobs[job_id]
            for k, v in fields.items():
                setattr(job, k, v)
            self._write(job)
            return job

    def _write(self, job: Job) -> None:
        write_json(self.folder(job.id) / "job.json", job.to_json())
        self.version += 1

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(str(job_id).strip())

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self.jobs.values(), key=lambda j: (j.created, j.id))

    def next_queued(self) -> Job | None:
        return next((j for j in self.all() if j.status == QUEUED), None)

    def close(self) -> None:
        if self._flock is not None:
            os.close(self._flock)
            self._flock = None


def _lock_dir(root: Path):
    """One server per jobs directory: two would run the same queued job twice."""
    if os.name != "posix":
        return None
    import fcntl

    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LowvramError(f"another lowvram ui is serving the jobs directory {root}; stop it or pass "
                           "another --jobs-dir") from None
    return fd
