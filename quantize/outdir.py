"""The output directory of a conversion: checks, a temporary sibling that is renamed at the end, and links.

Nothing is left behind on failure: all files go to `.<out>.partial-<pid>` next to `--out`, which becomes
`--out` only after everything was written. A killed run cannot clean up, so the next run for the same
`--out` (which holds the lock beside it, lowvram.io.locks) removes the staging directories of dead runs
(`clean_stale_staging`). Free space is checked against the planned size before anything is written, and a
disk that fills up anyway gives one line (`disk_error`) after the staging directory was removed.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from lowvram.constants import T5_FILE, TOKENIZER_DIR, VAE_FILE, WAV2VEC_DIR
from lowvram.errors import LowvramError
from lowvram.io.paths import pid_alive, refuse_out_as_input

# The non-DiT components of Wan2.2-S2V-14B (docs/model.md §2.1); linked so the output directory runs on its own.
COMPONENTS = (T5_FILE, TOKENIZER_DIR.split("/")[0], VAE_FILE, WAV2VEC_DIR)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text) -> int:
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


def check_out_dir(out: Path, inputs: Mapping[str, Path | None], force: bool) -> None:
    """Refuse an output directory that is not empty (unless force) or that is or holds an input
    (inputs: {option: path}, e.g. {"--ckpt-dir": ..., "--lora": ...})."""
    refuse_out_as_input(out, inputs, directory=True)
    out = out.resolve()
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


_STAGING_RE = r"^\.{name}\.(partial|old)-(\d+)$"
# the disk refused the bytes: full, over quota, too large, read-only, failing
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def clean_stale_staging(out: Path) -> list[str]:
    """Remove what dead runs for `out` left beside it; returns one line per thing found, for the log.

    `.<out>.partial-<pid>` of a dead process is removed. `.<out>.old-<pid>` (a run killed between moving the
    old --out aside and putting the new one in place) is removed when --out exists, else renamed back to
    --out. A live pid (another program may have reused it) is only reported, with the command to remove it.
    """
    out = out.resolve()
    pattern = re.compile(_STAGING_RE.format(name=re.escape(out.name)))
    notes = []
    try:
        entries = sorted(os.scandir(out.parent), key=lambda e: e.name)
    except OSError:
        return notes
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        kind, pid, path = m.group(1), int(m.group(2)), Path(entry.path)
        if pid == os.getpid():
            continue
        if pid_alive(pid):
            notes.append(f"note: {path} belongs to process {pid}, which is running; if it is not a lowvram "
                         f"quantize, remove it with: rm -rf {shlex.quote(str(path))}")
        elif kind == "old" and not out.exists():
            path.rename(out)
            notes.append(f"note: restored {out} from {path}, which a killed run had moved aside")
        else:
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"note: removed {path}, left by a quantize run that was killed (process {pid})")
    return notes


def check_free_space(out: Path, need: int) -> None:
    """Refuse, before any work, an --out whose disk has less free space than the output needs."""
    out = out.resolve()
    folder = next((p for p in (out, *out.parents) if p.exists()), out.anchor)
    free = shutil.disk_usage(folder).free
    if need <= free:
        return
    later = " (the existing --out is removed only once the new one is complete)" if out.is_dir() else ""
    raise LowvramError(f"--out {out} needs {human_size(need)} and its disk has {human_size(free)} free{later}; "
                       f"free {human_size(need - free)} there or choose an --out on another disk")


def disk_error(e: OSError, out: Path, need: int, ckpt_dir: Path) -> LowvramError:
    """The one line for a write that the disk refused mid-run (the staging directory is already gone)."""
    out = out.resolve()
    folder = next((p for p in (out, *out.parents) if p.exists()), out.anchor)
    free = shutil.disk_usage(folder).free
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    what = "free space or choose an --out on another disk" if full else "check the disk or choose another --out"
    return LowvramError(f"cannot write {out} ({e.strerror}): the output needs {human_size(need)}, the disk has "
                        f"{human_size(free)} free now; the partial output was removed and {ckpt_dir} is "
                        f"untouched; {what}")


def human_size(n: int) -> str:
    """Decimal units, as disks are sold and `df -H` prints: 17.23 GB, 905.4 kB."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


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
