"""One writer per output: an advisory `flock` on a lock file beside it, taken before any work.

`lock_output(out)` creates `.<name>.lock` in the output's folder and locks it without waiting; a second
process (or a second job of the same process) that asks for the same output gets a one-line LowvramError at
once, instead of two runs interleaving their frames in one file. The lock goes with the process (the kernel
drops it on exit, SIGKILL included), so a stale lock file never blocks a later run; `release()` also removes
the file. The file holds the owner's pid, for the message.

Removing a lock file is safe because a taker checks, once it holds the lock, that the path still names the
file it locked (a racing `release()` may have unlinked it), and starts over if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from lowvram.errors import LowvramError

_HELD: dict[str, "OutputLock"] = {}  # lock file (real path) -> the lock this process holds on it
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(target) -> Path:
    """`dir/.name.lock` for the output `dir/name` (a file or a directory)."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def _key(target) -> str:
    p = lock_path(target)
    return os.path.join(os.path.realpath(p.parent), p.name)


def holds_lock(target) -> bool:
    """Whether this process holds the lock of `target` now."""
    return _key(target) in _HELD


class OutputLock:
    """The lock of one output path; use `lock_output(path)` or `with OutputLock(path):`."""

    def __init__(self, target, flag: str = "--out"):
        self.target, self.flag = Path(target), flag
        self.path = lock_path(target)
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        key = _key(self.target)
        if _HELD.get(key) is self:  # `with lock_output(p):` enters a lock that is already taken
            return self
        if key in _HELD:
            raise LowvramError(f"{self.flag} {self.target} is already being written by this process (another job "
                               f"of the same batch?); give each job its own {self.flag}")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise LowvramError(f"cannot create the lock file {self.path} ({e.strerror}); the folder of "
                                   f"{self.flag} must be writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                who = f"process {owner}" if owner else "another process"
                raise LowvramError(f"{self.flag} {self.target} is being written by {who} right now (lock "
                                   f"{self.path}); wait for it to finish or choose another {self.flag}") from None
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                # a file system without flock (some network mounts): go on unlocked, as before the lock existed
                os.close(fd)
                fd = None
            if fd is None or _still_named(fd, self.path):
                break
            os.close(fd)  # a releasing owner unlinked the file between our open and our lock: take the new one
        self._fd = fd
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = self
        return self

    def release(self) -> None:
        key = _key(self.target)
        if _HELD.get(key) is not self:
            return
        del _HELD[key]
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still locked: a waiting taker then sees a different file
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(target, flag: str = "--out") -> OutputLock:
    """Lock `target` for this process (see the module docstring); call `.release()` or use it with `with`."""
    return OutputLock(target, flag).acquire()


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode().strip()
        return int(raw) if raw else None
    except (OSError, ValueError):
        return None


def _still_named(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
