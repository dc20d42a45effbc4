"""The live display of `lowvram run`: clips and blocks done, generated frames per second, ETA and
peak VRAM (CUDA), under a headline with the plan (resolution, scheme, attention)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lowvram.constants import GIB


class RichProgress:
    def __init__(self, console: Console | None = None, blocks_per_clip: int = 4):
        self.console = console or Console(stderr=True)
        self.blocks_per_clip = blocks_per_clip
        self.bar = None

    def start(self, total_blocks: int, clips: int, headline: str):
        self.console.print(f"[bold]lowvram[/bold] {headline}")
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                            console=self.console, transient=False)
        self.bar.start()
        self.task = self.bar.add_task("blocks", total=total_blocks, stats="")
        self.clips = clips

    def block_done(self, clip: int, block: int, frames: int, seconds: float, peak_bytes: int):
        fps = frames / seconds if seconds > 0 else 0.0
        stats = f"clip {clip + 1}/{self.clips} · {frames} frames · {fps:.2f} FPS"
        if peak_bytes:
            stats += f" · peak {peak_bytes / GIB:.1f} GiB"
        self.bar.update(self.task, advance=1, stats=stats)

    def finish(self):
        if self.bar is not None:
            self.bar.stop()


class PlainProgress:
    """One plain line per block, for output that is not a terminal (a file, a pipe, a batch log)."""

    def __init__(self, echo=None):
        import sys

        self.echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
        self.total = self.clips = 0

    def start(self, total_blocks: int, clips: int, headline: str):
        self.total, self.clips = total_blocks, clips
        self.echo(f"lowvram {headline}")

    def block_done(self, clip: int, block: int, frames: int, seconds: float, peak_bytes: int):
        fps = frames / seconds if seconds > 0 else 0.0
        peak = f", peak {peak_bytes / GIB:.1f} GiB" if peak_bytes else ""
        done = clip * 4 + block + 1
        eta = seconds / done * (self.total - done)
        self.echo(f"block {done}/{self.total} (clip {clip + 1}/{self.clips}): {frames} frames, {fps:.2f} FPS, "
                  f"{seconds:.1f} s, about {eta:.0f} s left{peak}")

    def finish(self):
        pass


def make_progress():
    """The rich bar on a terminal, one plain line per block otherwise."""
    import sys

    return RichProgress() if sys.stderr.isatty() else PlainProgress()
