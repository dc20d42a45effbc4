"""On-disk cache of umT5 prompt embeddings, keyed by the prompt and the T5 file's identity, so a
second run with the same prompt does not load T5 at all.

The cache only saves time, so it never stops a run: a cache folder that is missing and cannot be created,
read-only, or on a full disk gives one warning line (naming LOWVRAM_CACHE, the variable that moves it) and
the run goes on without it. An entry is written to a temporary name and renamed, so a failed write leaves
no partial file under the entry's name (and the temporary file is removed).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load as _parse
from safetensors.torch import save as _serialize

ENV = "LOWVRAM_CACHE"
_warned: set[str] = set()  # one warning per cache folder and process


def cache_dir() -> Path:
    base = os.environ.get(ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "lowvram")
    return Path(base) / "prompts"


def prompt_key(prompt: str, t5_path: Path, t5_mode: str) -> str:
    """The file's identity is its inode (device, inode, size, mtime), not its name: the int8 and fp8
    directories that `lowvram quantize` writes hold hard links to one umT5 file, and share its entries."""
    st = Path(t5_path).stat()
    ident = f"{st.st_dev}:{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{t5_mode}|{prompt}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _warn(log, message: str) -> None:
    d = str(cache_dir())
    if d in _warned:
        return
    _warned.add(d)
    (log or (lambda m: print(m, file=sys.stderr)))(f"warning: {message}")


def _read(name: str) -> bytes | None:
    try:
        return (cache_dir() / name).read_bytes()
    except OSError:  # absent, or a folder we may not read: a miss either way
        return None


def _store(name: str, data: bytes, log) -> bool:
    d = cache_dir()
    tmp = d / f".{name}.{os.getpid()}.tmp"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _warn(log, f"the prompt cache {d} cannot be created ({e.strerror}); running without it "
                   f"(set {ENV} to a writable folder to keep prompt embeddings)")
        return False
    try:
        with open(tmp, "wb") as f:
            _write(f, data)
        os.replace(tmp, d / name)
        return True
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = f"the disk of the prompt cache {d} is full; nothing was cached"
        else:
            why = f"the prompt cache {d} is not writable ({e.strerror}); running without it"
        _warn(log, f"{why} (set {ENV} to another folder to keep prompt embeddings)")
        return False


def _write(f, data: bytes) -> None:
    f.write(data)  # the one place cache bytes reach the disk (tests inject ENOSPC here)
    f.flush()


def load(key: str):
    """The cached [L, dim] embedding for `key`, or None (not cached, unreadable or damaged)."""
    raw = _read(f"{key}.safetensors")
    if raw is None:
        return None
    try:
        return _parse(raw)["context"]
    except Exception:  # a damaged entry (any safetensors error) is recomputed, never fatal
        return None


def store(key: str, context: torch.Tensor, log=None) -> bool:
    """Cache an embedding; False (after one warning through `log`, default stderr) when it cannot be kept."""
    return _store(f"{key}.safetensors", _serialize({"context": context.detach().cpu().contiguous()}), log)


def read_note(name: str) -> str | None:
    """A small text entry of the cache (e.g. the T5 cosine marker), or None."""
    raw = _read(name)
    return raw.decode(errors="replace") if raw is not None else None


def write_note(name: str, text: str, log=None) -> bool:
    """Write a small text entry; like `store`, a cache that cannot keep it only warns."""
    return _store(name, text.encode(), log)
