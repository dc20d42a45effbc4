"""The mp4 encoder on its own thread, so that a block's encoding overlaps the next block's DiT work.

    writer = BackgroundWriter(VideoWriter(path, w, h, ...))
    kept = writer.write(frames)   # converts to uint8 here, encodes on the thread; returns the frames kept
    writer.close()                # waits for the encoder, then VideoWriter.close()

At full size the encoder (libx264 at CRF 10, then the muxer's flush) took about 0.19 s per 12-frame block on
the generating thread (BENCHMARKS.md §6), time the GPU sat idle. Here at most one block waits for the
encoder: write() first waits for the block before it, so memory stays bounded and a disk error surfaces one
block later as the same VideoWriteError (raised by the next write(), close() or abandon()'s caller).
The first block is encoded before write() returns, so "time to the first frame" means on disk.

What the file holds on each stop is VideoWriter's rule, with one difference: a SIGKILL or crash can lose the
block that was still being encoded (at most one block), besides the one in flight in the DiT.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from lowvram.io.video_writer import ClosesOrAbandons


class BackgroundWriter(ClosesOrAbandons):
    """A VideoWriter whose write() returns while the frames are encoded on one worker thread."""

    def __init__(self, writer):
        self._w = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowvram-mp4")
        self._pending: Future | None = None
        self._error: BaseException | None = None
        self.path, self.partial_path = writer.path, writer.partial_path

    # ------------------------------------------------------------------ the VideoWriter interface
    @property
    def frames_written(self) -> int:
        """Frames on disk (waits for the block being encoded)."""
        self._wait(raise_error=False)
        return self._w.frames_written

    def write(self, frames) -> int:
        """Queue `frames` ([T, H, W, 3] uint8 or float [3, T, H, W] in [-1, 1]); returns how many are kept."""
        self._wait()  # the previous block is on disk (or its error is raised here)
        frames = np.ascontiguousarray(self._w._as_uint8(frames))  # the device->host copy stays on this thread
        kept = self._w.kept(len(frames))  # nothing is pending now: the writer's count is every frame sent
        first = self._w.frames_written == 0
        self._pending = self._pool.submit(self._w.write, frames[:kept])
        if first:
            self._wait()
        return kept

    def close(self):
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        return self._w.close()

    def abandon(self):
        self._wait(raise_error=False)
        self._pool.shutdown(wait=True)
        return self._w.abandon()

    # ------------------------------------------------------------------ internals
    def _wait(self, raise_error: bool = True) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            try:
                fut.result()
            except BaseException as e:  # kept, so that close()/abandon() after a failed write see it too
                self._error = e
        if raise_error and self._error is not None:
            err, self._error = self._error, None
            raise err

