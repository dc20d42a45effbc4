"""The runner the batch loop and the web page drive: `lowvram.pipeline.session.Session`.

    runner = make_runner(log)
    result = runner.run(opts, progress=None, on_block=None, should_stop=None)   # -> RunResult
    runner.close()

The Session keeps the DiT placed and the VAE loaded across jobs while the checkpoint and the plan stay
the same. `on_block(ev: BlockEvent)` is called after each block is written (ev.path is the fragmented
mp4 being written, readable while it grows); `should_stop()` is polled at block boundaries (True: the
block in flight finishes, the file is closed playable and `result.interrupted` is True); `progress` gets
`start(total_blocks, clips, headline)` / `block_done(...)` / `finish()` as `lowvram run`'s display does.
"""

from __future__ import annotations

from typing import Callable, Protocol

from lowvram.pipeline.options import BlockEvent, RunOptions, RunResult

__all__ = ["BlockEvent", "JobRunner", "make_runner"]


class JobRunner(Protocol):
    def run(self, opts: RunOptions, progress=None, on_block: Callable[[BlockEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult: ...

    def close(self) -> None: ...


def make_runner(log=print) -> JobRunner:
    """A Session: the models load once for all the jobs of a batch or a server."""
    from lowvram.pipeline.session import Session

    return Session(log=log)
