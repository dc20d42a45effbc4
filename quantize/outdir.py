"""The output directory of a conversion: checks, a temporary sibling that is renamed at the end, and links.

Nothing is left behind on failure: all files go to `.<out>.partial-<pid>` next to `--out`, which becomes
`--out` only after everything was written.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from lowvram.constants import T5_FILE, TOKENIZER_DIR, VAE_FILE, WAV2VEC_DIR
from lowvram.errors import LowvramError

# The non-DiT components of Wan2.2-S2V-14B (docs/model.md §2.1); linked so the output directory runs on its own.
COMPONENTS = (T5_FILE, TOKENIZER_DIR.split("/")[0], VAE_FILE, WAV2VEC_DIR)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text) -> int:
    """"3GB" -> 3_000_000_000, "512MiB" -> 536_870_912, 1000 -> 1000."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE_RE.match(str(text))
        unit = (m[2] or "").lower() if m else None
        if not m or unit not in _UNITS:
            raise LowvramError(f"cannot read the size {text!r}; write it like 3GB, 500MB or 2GiB")
        size = int(float(m[1]) * _UNITS[unit])
    if size < 1:
        raise LowvramError(f"the size {text!r} must be positive")
    return size


def check_out_dir(out: Path, sources: list[Path], force: bool) -> None:
    """Refuse an output directory that is not empty (unless force) or that would swallow an input."""
    out = out.resolve()
    for src in sources:
        src = src.resolve()
        if src == out or out in src.parents:
            raise LowvramError(f"--out {out} contains the input {src}; choose another output directory")
    if out.exists() and not out.is_dir():
        raise LowvramError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LowvramError(f"--out {out} exists and is not empty; choose a new directory or pass --force to replace it")


@contextmanager
def staged_dir(out: Path):
    """Yield a fresh temporary directory next to `out`; on success it replaces `out`, on any error it vanishes."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def link_file(src: Path, dst: Path) -> str:
    """Hard-link src to dst, else symlink, else copy; returns which one was done."""
    src = src.resolve()
    for how, make in (("hardlink", os.link), ("symlink", os.symlink)):
        try:
            make(src, dst)
            return how
        except OSError:  # another file system, or links not allowed here: try the next way
            continue
    shutil.copy2(src, dst)
    return "copy"


def link_components(src_dir: Path, dst_dir: Path) -> dict[str, str]:
    """Link every component present in src_dir into dst_dir (directories file by file).

    Returns name -> "hardlink"/"symlink"/"copy"/"missing" (several ways joined by "+").
    """
    done = {}
    for name in COMPONENTS:
        src = src_dir / name
        if src.is_file():
            done[name] = link_file(src, dst_dir / name)
        elif src.is_dir():
            ways = set()
            for path in sorted(src.rglob("*")):
                if path.is_dir():
                    continue
                target = dst_dir / name / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                ways.add(link_file(path, target))
            done[name] = "+".join(sorted(ways)) or "empty"
        else:
            done[name] = "missing"
    return done
