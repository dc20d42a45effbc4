"""Output paths checked against the inputs before any work, and the liveness of the process that named a file.

Every command that takes paths calls `refuse_out_as_input` once per output: an output that names one of the
inputs (through a symlink or a hard link as well) would overwrite it, and a directory output that holds an
input would delete it when replaced.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lowvram.errors import LowvramError


def same_path(a, b) -> bool:
    """True when a and b name the same file: the same inode if both exist (hard links and symlinks
    included), else the same absolute path with symlinks of the folders resolved."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:  # unreadable: fall back to the names
            pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path, folder) -> bool:
    """True when `path` lies somewhere under the existing directory `folder` (resolved, any link)."""
    p = Path(os.path.realpath(path))
    for parent in p.parents:
        if parent.exists() and same_path(parent, folder):
            return True
    return False


def refuse_out_as_input(out, inputs: Mapping[str, object], flag: str = "--out", directory: bool = False) -> None:
    """Raise LowvramError when the output `out` is one of `inputs` ({option: path or None}).

    directory=True: `out` is a directory that the command replaces as a whole (`lowvram quantize --force`),
    so an input inside it is refused as well. Call it before any work (loading, writing, locking).
    """
    out = Path(out)
    for option, src in inputs.items():
        if src is None:
            continue
        src = Path(src)
        if same_path(out, src):
            what = "directory" if src.is_dir() else "file"
            raise LowvramError(f"{flag} {out} is the same {what} as the input {option} {src}; "
                               f"writing it would destroy the input: choose another {flag}")
        if directory and out.is_dir() and _inside(src, out):
            raise LowvramError(f"{flag} {out} contains the input {option} {src}; replacing it would delete the "
                               f"input: choose another {flag}")


def refuse_clashing_outputs(outputs: Mapping[str, object]) -> None:
    """Raise LowvramError when two outputs ({label: path or None}, e.g. {"--out": ..., "--report": ...} or
    one entry per batch job) name the same file: one would overwrite the other."""
    seen: list[tuple[str, Path]] = []
    for label, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        for other_label, other in seen:
            if same_path(path, other):
                raise LowvramError(f"{other_label} {other} and {label} {path} name the same file; one would "
                                   "overwrite the other: give each its own path")
        seen.append((label, path))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists now (it may be another program that reused the id)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
