"""`lowvram run` as one call: a Session that makes one video, with SIGINT/SIGTERM finishing the block in
flight and closing the file (the mp4 is fragmented, so even a killed process leaves a playable file)."""

from __future__ import annotations

import signal

from lowvram.pipeline.options import RunOptions, RunResult
from lowvram.pipeline.session import Session


class StopFlag:
    """SIGINT/SIGTERM set a flag; generation stops after the block in flight is written."""

    def __init__(self):
        self.stop = False
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.stop, self.signal = True, signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(opts: RunOptions, progress=None, log=print) -> RunResult:
    """Generate the video described by opts in a fresh Session (models loaded for this one video)."""
    session = Session(log=log)
    try:
        with StopFlag() as flag:
            res = session.run(opts, progress=progress, should_stop=lambda: flag.stop)
            res.stop_signal = flag.signal if res.interrupted else None
            return res
    finally:
        session.close()
