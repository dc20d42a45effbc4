"""The temporary name a video is written under, and the partial videos that earlier runs left beside an output.

A run writes `--out dir/name.mp4` as `dir/.name.partial-<pid>.mp4` and renames it to `name.mp4` when it
closes normally (also after Ctrl-C/SIGTERM). A run that was killed, crashed or hit a write error leaves the
partial file, which holds every block that was finished (fragmented MP4). `partials_note(out)` is the line a
later run prints about them; they are the user's frames, so nothing here deletes them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lowvram.constants import FPS
from lowvram.io.mp4frag import count_frames
from lowvram.io.paths import pid_alive


def partial_path_for(out, pid: int | None = None, n: int = 0) -> Path:
    """`dir/.name.partial-<pid>.mp4` for `dir/name.mp4` (hidden, same folder: the rename is atomic);
    n > 0 gives `.name.partial-<pid>-<n>.mp4`, for a later job of the same process."""
    out = Path(out)
    pid = os.getpid() if pid is None else pid
    return out.with_name(f".{out.stem}.partial-{pid}{f'-{n}' if n else ''}{out.suffix}")


def free_partial_path(out) -> Path:
    """This process's first partial name for `out` that no file has (an abandoned job's file is kept)."""
    n = 0
    while os.path.lexists(path := partial_path_for(out, n=n)):
        n += 1
    return path


@dataclass(frozen=True)
class PartialVideo:
    path: Path
    pid: int
    alive: bool  # a process with that id runs now (the writer itself, or an unrelated one that reused the id)

    def frames(self) -> int:
        return count_frames(self.path)


def find_partials(out, include_own: bool = False) -> list[PartialVideo]:
    """Partial videos beside `out` (any pid), oldest first; this process's own only with include_own."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(out.stem)}\.partial-(\d+)(?:-\d+)?{re.escape(out.suffix)}$")
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() and not include_own:
            continue
        found.append((entry.stat().st_mtime, PartialVideo(folder / entry.name, pid, pid_alive(pid))))
    return [p for _, p in sorted(found, key=lambda t: (t[0], t[1].path.name))]


def partials_note(out) -> str | None:
    """One line about the partial videos earlier (dead) runs left beside `out`, or None if there are none."""
    left = [p for p in find_partials(out) if not p.alive]
    if not left:
        return None
    if len(left) == 1:
        n = left[0].frames()
        return (f"a partial video from an earlier run is at {left[0].path} ({n} frames, {n / FPS:.1f} s); "
                f"rename it to keep it, or delete it")
    names = ", ".join(str(p.path) for p in left)
    return f"{len(left)} partial videos from earlier runs are beside {out}: {names}; rename them to keep them, or delete them"
