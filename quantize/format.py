"""The self-describing quantized checkpoint: what the converter writes and how the runtime recognises it.

A quantized directory holds the usual `diffusion_pytorch_model.safetensors.index.json` and shards, but each
shard's header `__metadata__` carries `format: lowvram`, `version`, `scheme`, and a quantized Linear `X` is
stored as `X.qweight` (int8 or float8_e4m3fn [out, in]) + `X.scale` (fp32 [out]) + `X.bias` (bf16).
`manifest.json` records the sources, the LoRA, per-layer SQNR and each shard's size and SHA-256.
The format is read from this metadata, never from a file name.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lowvram.constants import INDEX_FILE, SINGLE_FILE
from lowvram.errors import CheckpointError
from lowvram.quantize.linear import SCHEMES
from lowvram.quantize.shards import read_header

FORMAT_NAME = "lowvram"
FORMAT_VERSION = "1"
MANIFEST_NAME = "manifest.json"
STAMP_NAME = "verified.json"  # shards whose SHA-256 matched the manifest, with the file identity they had then
HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class QuantInfo:
    """A quantized DiT checkpoint: its scheme, format version and shard files (relative names)."""
    scheme: str
    version: str
    shards: tuple[str, ...]


def sha256_file(path: Path, on_chunk=None) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks; on_chunk(bytes) after each (progress, or raise to stop)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return h.hexdigest()


def read_index(ckpt_dir: Path) -> dict[str, str] | None:
    """weight_map (key -> shard file) of the index json; a single-file checkpoint maps to itself; None if neither."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            raw = json.loads(index.read_text())
            weight_map = raw["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a safetensors index (JSON with a weight_map); re-download it") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has an empty weight_map; re-download it")
        return {str(k): str(v) for k, v in weight_map.items()}
    single = ckpt_dir / SINGLE_FILE
    if single.is_file():
        keys = [k for k in read_header(single) if k != "__metadata__"]
        return {k: SINGLE_FILE for k in keys}
    return None


def _shard_meta(path: Path) -> dict:
    meta = read_header(path).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _check_meta(meta: dict, where: Path) -> None:
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{where} is lowvram format version {meta.get('version')!r}, but this lowvram reads "
                              f"version {FORMAT_VERSION}; re-run `lowvram quantize` with this version")
    if meta.get("scheme") not in SCHEMES:
        raise CheckpointError(f"{where} names an unknown scheme {meta.get('scheme')!r}; re-run `lowvram quantize`")


def detect_format(ckpt_dir) -> QuantInfo | None:
    """QuantInfo if the DiT shards of `ckpt_dir` carry lowvram metadata, None for a plain checkpoint.

    Unknown versions or shards that disagree on the scheme raise CheckpointError.
    """
    ckpt_dir = Path(ckpt_dir)
    weight_map = read_index(ckpt_dir)
    if weight_map is None:
        return None
    shards = tuple(sorted(set(weight_map.values())))
    metas = {s: _shard_meta(ckpt_dir / s) for s in shards if (ckpt_dir / s).is_file()}
    ours = {s: m for s, m in metas.items() if m.get("format") == FORMAT_NAME}
    if not ours:
        return None
    for s, m in ours.items():
        _check_meta(m, ckpt_dir / s)
    schemes = {m["scheme"] for m in ours.values()}
    if len(schemes) > 1 or len(ours) != len(metas):
        raise CheckpointError(f"{ckpt_dir}: its shards mix formats or schemes ({sorted(schemes)}); "
                              "re-run `lowvram quantize` into an empty directory")
    return QuantInfo(scheme=schemes.pop(), version=FORMAT_VERSION, shards=shards)


def verify_manifest(ckpt_dir, verify_hashes: bool = True) -> dict:
    """Check manifest.json against the shards on disk: present, same size, same SHA-256 (unless skipped).

    Returns the manifest. A missing or altered shard, or an unknown format version, raises CheckpointError.
    """
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; this quantized directory is incomplete: re-run `lowvram quantize`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a lowvram manifest; re-run `lowvram quantize`") from None
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a lowvram manifest; re-run `lowvram quantize`")
    if str(manifest.get("version")) != FORMAT_VERSION:
        raise CheckpointError(f"{path} is lowvram format version {manifest.get('version')!r}, but this lowvram "
                              f"reads version {FORMAT_VERSION}; re-run `lowvram quantize` with this version")
    for entry in shards:
        shard = ckpt_dir / entry["file"]
        if not shard.is_file():
            raise CheckpointError(f"quantized shard {shard} is missing; copy it back or re-run `lowvram quantize`")
        size = shard.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"quantized shard {shard} has {size} bytes, the manifest says {entry['size']}; "
                                  "the file is damaged: re-run `lowvram quantize`")
        _check_meta(_shard_meta(shard), shard)
    if verify_hashes:
        _verify_hashes(ckpt_dir, shards)
    return manifest


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _read_stamp(ckpt_dir: Path) -> dict:
    try:
        stamp = json.loads((ckpt_dir / STAMP_NAME).read_text())
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


def write_stamp(ckpt_dir: Path, entries: list[dict]) -> None:
    """Record that these manifest entries' shards hashed right, with each file's size, mtime, inode and device;
    best effort (a read-only directory only means the next run hashes again), replaced atomically."""
    stamp = {e["file"]: {"sha256": e["sha256"], "identity": _identity(ckpt_dir / e["file"])} for e in entries}
    tmp = ckpt_dir / f".{STAMP_NAME}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(stamp, indent=1))
        os.replace(tmp, ckpt_dir / STAMP_NAME)
    except OSError:
        tmp.unlink(missing_ok=True)


def _verify_hashes(ckpt_dir: Path, shards: list[dict]) -> None:
    """SHA-256 of every shard against the manifest, the shards in parallel (hashlib and reads release the GIL).
    A shard hashed right before and unchanged since (same size, mtime, inode and device as recorded in
    verified.json) is not hashed again: the 16.7 GB of a full-size quantized DiT took ~17 s to hash on every
    run. A file replaced, copied or rewritten changes its identity and is hashed; silent corruption in place is
    not caught after the first check (delete verified.json to hash everything again)."""
    stamp = _read_stamp(ckpt_dir)
    todo = [e for e in shards if stamp.get(e["file"]) != {"sha256": e["sha256"],
                                                           "identity": _identity(ckpt_dir / e["file"])}]
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
        digests = list(pool.map(lambda e: sha256_file(ckpt_dir / e["file"]), todo))
    for entry, digest in zip(todo, digests):
        if digest != entry["sha256"]:
            raise CheckpointError(f"quantized shard {ckpt_dir / entry['file']} does not match its SHA-256 in the "
                                  "manifest; the file is damaged: re-run `lowvram quantize` (or pass --no-verify "
                                  "to skip hashing)")
    write_stamp(ckpt_dir, shards)


def quantized_module_names(ckpt_dir) -> dict[str, str]:
    """Module name -> scheme of every quantized Linear in the shards (for `apply_quant_layers`)."""
    ckpt_dir = Path(ckpt_dir)
    weight_map = read_index(ckpt_dir) or {}
    out = {}
    for shard in sorted(set(weight_map.values())):
        header = read_header(ckpt_dir / shard)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != FORMAT_NAME:
            continue
        _check_meta(meta, ckpt_dir / shard)
        for key in header:
            if key.endswith(".qweight"):
                out[key[: -len(".qweight")]] = meta["scheme"]
    return dict(sorted(out.items()))
