"""On-disk cache of umT5 prompt embeddings, keyed by the prompt and the T5 file's identity, so a
second run with the same prompt does not load T5 at all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    base = os.environ.get("LOWVRAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "lowvram")
    return Path(base) / "prompts"


def prompt_key(prompt: str, t5_path: Path, t5_mode: str) -> str:
    st = Path(t5_path).stat()
    ident = f"{Path(t5_path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{t5_mode}|{prompt}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def load(key: str):
    path = cache_dir() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["context"]
    except Exception:  # a damaged cache entry is recomputed, never fatal
        return None


def store(key: str, context: torch.Tensor) -> None:
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.{os.getpid()}.tmp"
    save_file({"context": context.detach().cpu().contiguous()}, str(tmp))
    os.replace(tmp, d / f"{key}.safetensors")
