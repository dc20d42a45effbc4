"""The demo's temporary folder, and the folders killed demos left behind.

`demo_workdir()` is `tempfile.TemporaryDirectory(prefix="lowvram-demo-")` plus a lock file inside that the
demo holds (flock) while it runs. A demo killed by SIGKILL (or SIGTERM before it could stop) cannot remove
its folder; `clean_stale_demo_dirs()` removes every `lowvram-demo-*` folder of this user whose lock nobody
holds. Folders made before the lock existed (plain TemporaryDirectory) are removed once nothing in them
changed for STALE_AFTER_S, since no demo runs that long without writing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PREFIX = "lowvram-demo-"
LOCK_NAME = ".lowvram-demo.lock"
STALE_AFTER_S = 3600


@contextmanager
def demo_workdir():
    """A fresh temporary folder for one demo (yields its Path), locked while the demo runs, removed after."""
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        fd = os.open(os.path.join(tmp, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield Path(tmp)
        finally:
            os.close(fd)


def _in_use(folder: Path, now: float) -> bool:
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return now - _newest_mtime(folder) < STALE_AFTER_S  # an unlocked (older) demo: judge by its age
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _newest_mtime(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


def clean_stale_demo_dirs(tmp_root=None) -> list[Path]:
    """Remove the `lowvram-demo-*` folders of killed demos in `tmp_root` (default: the system's temporary
    folder) that belong to this user; returns the removed paths, for one line in the demo's output."""
    root = Path(tmp_root or tempfile.gettempdir())
    removed, now = [], time.time()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue  # a symlink, a file, or someone else's: never ours to remove
        folder = Path(entry.path)
        if _in_use(folder, now):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return sorted(removed)
