"""One job through a runner: generated to `<stem>.partial.mp4`, renamed to `out` when complete, sidecar beside.

The sidecar is written `running` before the run, and `done` (with the final file's size) only after the
rename, so a process that dies at any point leaves a job that the next run redoes (lowvram.jobs.sidecar).
An interrupted run keeps its playable partial file under the partial name. Does not rely on the
VideoWriter's own temporary name (issue 16): the writer may add one under ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from lowvram.errors import LowvramError
from lowvram.jobs import sidecar


@dataclass
class Outcome:
    status: str                  # done | interrupted | failed
    file: Path | None            # the mp4 holding the video (out when done, the partial file otherwise)
    result: object = None        # RunResult (None when failed)
    error: str | None = None     # one line when failed
    side: dict | None = None     # the sidecar as written


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, LowvramError) else f"{type(e).__name__}: {text}"


class _Headline:
    """Progress wrapper that keeps the plan's headline for the sidecar."""

    def __init__(self, inner):
        self.inner, self.headline = inner, None

    def start(self, total_blocks, clips, headline):
        self.headline = headline
        if self.inner is not None:
            self.inner.start(total_blocks=total_blocks, clips=clips, headline=headline)

    def block_done(self, *a):
        if self.inner is not None:
            self.inner.block_done(*a)

    def finish(self):
        if self.inner is not None:
            self.inner.finish()


def execute(runner, opts, progress=None, on_block=None, should_stop=None, on_start=None) -> Outcome:
    """Run `opts` through `runner` under the temporary-name + rename + sidecar rule. Never raises for a
    failing job (the Outcome says failed, with one line); KeyboardInterrupt passes through."""
    out = Path(opts.out)
    part = sidecar.partial_path(out)
    side = sidecar.new(opts)
    spath = sidecar.sidecar_path(out)
    try:
        from lowvram.io.video_writer import check_output_path

        check_output_path(str(out))
        for stale in (out, part):   # a redo: the final name holds only a complete video of this sidecar
            if stale.exists():
                stale.unlink()
        sidecar.write_json(spath, side)
    except (LowvramError, OSError) as e:
        return Outcome("failed", None, error=one_line(e))
    if on_start is not None:
        on_start(part)
    track = _Headline(progress)
    try:
        res = runner.run(replace(opts, out=part, partial_out=True), progress=track, on_block=on_block, should_stop=should_stop)
    except Exception as e:  # the job fails, the batch or the server goes on
        side.update(status="failed", error=one_line(e), headline=track.headline, finished=sidecar.now(),
                    file=part.name if part.exists() else None)
        sidecar.write_json(spath, side)
        return Outcome("failed", part if part.exists() else None, error=side["error"], side=side)
    side.update(headline=track.headline, result=sidecar.result_json(res), finished=sidecar.now())
    if res.interrupted or not part.exists():
        side.update(status="interrupted", file=part.name if part.exists() else None)
        sidecar.write_json(spath, side)
        return Outcome("interrupted", part if part.exists() else None, res, side=side)
    os.replace(part, out)
    side.update(status="done", file=out.name, bytes=out.stat().st_size)
    sidecar.write_json(spath, side)
    return Outcome("done", out, res, side=side)
