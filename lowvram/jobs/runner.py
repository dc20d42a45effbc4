"""The runner the batch loop and the web page drive: `Session.run`'s signature (issue 10).

    runner = make_runner(log)
    result = runner.run(opts, progress=None, on_block=None, should_stop=None)   # -> RunResult
    runner.close()

`on_block(ev: BlockEvent)` is called after each block is written to `opts.out`; `should_stop()` is
polled at block boundaries (True: the block in flight finishes, the file is closed playable and
`result.interrupted` is True); `progress` gets `start(total_blocks, clips, headline)` / `block_done(...)` /
`finish()` as `lowvram run`'s display does.

Today `OneShotRunner` adapts the one-shot `lowvram.pipeline.run.run(opts, progress, log)`: it loads the
models for every job. `lowvram.pipeline.session.Session` keeps them loaded across jobs; when it lands,
`make_runner` returns `Session(log=log)` and nothing else changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from lowvram.pipeline.run import RunOptions, RunResult


@dataclass
class BlockEvent:
    """The contract's BlockEvent (issue 10): one block written."""

    clip: int
    block: int
    blocks_done: int
    blocks_total: int
    frames: int            # written so far
    seconds: float         # since generation began
    peak_vram_bytes: int
    path: Path             # the mp4 being written (fragmented, readable while it grows)


class JobRunner(Protocol):
    def run(self, opts: RunOptions, progress=None, on_block: Callable[[BlockEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult: ...

    def close(self) -> None: ...


class _Stop(Exception):
    """Raised from block_done to end the one-shot run at a block boundary (the writer closes the file)."""


class _Bridge:
    """The one-shot run's progress sink: forwards to `progress`, emits BlockEvents, asks should_stop."""

    def __init__(self, opts, progress, on_block, should_stop):
        self.path, self.progress, self.on_block, self.should_stop = Path(opts.out), progress, on_block, should_stop
        self.total = self.clips = self.blocks = self.frames = self.peak = 0
        self.seconds = 0.0
        self.t0 = time.perf_counter()

    def start(self, total_blocks: int, clips: int, headline: str):
        self.total, self.clips = total_blocks, clips
        if self.progress is not None:
            self.progress.start(total_blocks=total_blocks, clips=clips, headline=headline)

    def block_done(self, clip: int, block: int, frames: int, seconds: float, peak_bytes: int):
        self.blocks += 1
        self.frames, self.seconds, self.peak = frames, seconds, peak_bytes
        if self.progress is not None:
            self.progress.block_done(clip, block, frames, seconds, peak_bytes)
        if self.on_block is not None:
            self.on_block(BlockEvent(clip, block, self.blocks, self.total, frames, seconds, peak_bytes, self.path))
        if self.should_stop is not None and self.should_stop() and self.blocks < self.total:
            raise _Stop

    def finish(self):
        if self.progress is not None:
            self.progress.finish()


class OneShotRunner:
    """JobRunner over `lowvram.pipeline.run.run`: every job loads the models again (Session will not)."""

    def __init__(self, log=print):
        self.log = log

    def run(self, opts: RunOptions, progress=None, on_block=None, should_stop=None) -> RunResult:
        from lowvram.pipeline.run import run

        bridge = _Bridge(opts, progress, on_block, should_stop)
        try:
            return run(opts, progress=bridge, log=self.log)
        except _Stop:
            return RunResult(Path(opts.out), bridge.frames, bridge.clips, bridge.blocks, bridge.seconds,
                             interrupted=True, peak_vram=bridge.peak)

    def close(self) -> None:
        pass


def make_runner(log=print) -> JobRunner:
    """The one place that picks the runner: swap for `Session(log=log)` once issue 10 lands."""
    return OneShotRunner(log=log)
