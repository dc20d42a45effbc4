"""Checkpoint discovery and loading (docs/model.md §2.1): the DiT from sharded, memory-mapped safetensors,
built on the meta device and assigned (no second copy), with the LiveAvatar LoRA merged per layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowvram.constants import INDEX_FILE, SINGLE_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE, WAV2VEC_DIR
from lowvram.errors import CheckpointError
from lowvram.model.config import DiTConfig

LAYOUT = (f"config.json, {INDEX_FILE} + diffusion_pytorch_model-0000N-of-0000M.safetensors, {T5_FILE}, "
          f"{TOKENIZER_DIR}/, {VAE_FILE}, {WAV2VEC_DIR}/")
# `hf` is huggingface_hub's command since 0.34; 1.0 removed the older `huggingface-cli`
DOWNLOAD_CKPT = "hf download Wan-AI/Wan2.2-S2V-14B --local-dir ckpt/Wan2.2-S2V-14B"
DOWNLOAD_LORA = "hf download Quark-Vision/Live-Avatar --local-dir ckpt/LiveAvatar"
DOWNLOAD = f"{DOWNLOAD_CKPT} && {DOWNLOAD_LORA} (hf comes with huggingface_hub >= 0.34)"


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: Path
    shards: tuple[Path, ...]
    weight_map: dict  # key -> shard file name
    t5: Path
    tokenizer: Path
    vae: Path
    wav2vec: Path

    def dit_config(self) -> DiTConfig:
        return dit_config_of(self.config, self.shards)

    def shape_of(self, key: str):
        return self.shapes().get(key)

    def tensor_bytes(self) -> dict:
        """key -> stored bytes of every DiT tensor, from the shard headers (exact for quantized shards)."""
        from lowvram.quantize.shards import tensor_bytes

        return tensor_bytes(self.shards)

    def shapes(self) -> dict:
        """key -> shape of every DiT tensor, read from the shard headers (no tensor data)."""
        if not hasattr(self, "_shapes"):
            out = {}
            for shard in self.shards:
                with _open(shard) as f:
                    for k in f.keys():
                        out[k] = tuple(f.get_slice(k).get_shape())
            object.__setattr__(self, "_shapes", out)
        return self._shapes


def dit_config_of(config: Path, shards) -> DiTConfig:
    """config.json, with the wav2vec2 layer count the audio encoder weighs read off its weight's shape."""
    from lowvram.quantize.shards import read_header

    cfg = DiTConfig.from_json(config)
    for shard in shards:
        entry = read_header(shard).get("casual_audio_encoder.weights")
        if entry is not None:
            shape = entry["shape"]
            if len(shape) == 4 and shape[1] != cfg.num_audio_layers:
                cfg = DiTConfig.from_dict({**cfg.to_dict(), "num_audio_layers": shape[1]})
            break
    return cfg


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())}); "
                              "re-download it") from None


def mapped_tensors(path: Path) -> dict:
    """Every tensor of a safetensors file as a view of one private memory map: no copy is made, and
    pages are read only when touched (moving a tensor to the GPU reads it once)."""
    from lowvram.quantize.shards import NAME_DTYPES, read_header_at

    header, base = read_header_at(path)  # checked against the file's size: a truncated shard is refused
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    out = {}
    for k in (k for k in header if k != "__metadata__"):
        info = header[k]
        dtype = NAME_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {k} has dtype {info['dtype']} that lowvram does not read")
        start, end = info["data_offsets"]
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, base + start, (end - start,))
        if (base + start) % dtype.itemsize:
            raw = raw.clone()  # misaligned for a zero-copy view of this dtype
        out[k] = raw.view(dtype).view(info["shape"])
    return out


def discover(ckpt_dir) -> Checkpoint:
    """Validate a Wan2.2-S2V-14B directory; one error lists everything that is missing."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist; expected layout: {LAYOUT}; "
                              f"download with: {DOWNLOAD}")
    missing = [n for n in ("config.json", T5_FILE, VAE_FILE) if not (root / n).is_file()]
    missing += [n + "/" for n in (TOKENIZER_DIR, WAV2VEC_DIR) if not (root / n).is_dir()]
    weight_map = {}
    if (root / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{root / INDEX_FILE} is not a valid index ({e}); re-download it") from None
        missing += sorted({s for s in weight_map.values() if not (root / s).is_file()})
    elif (root / SINGLE_FILE).is_file():
        with _open(root / SINGLE_FILE) as f:
            weight_map = {k: SINGLE_FILE for k in f.keys()}
    else:
        missing.append(INDEX_FILE)
    if missing:
        raise CheckpointError(f"checkpoint {root} is incomplete, missing: {', '.join(missing)}; "
                              f"expected layout: {LAYOUT}; download with: {DOWNLOAD}")
    shards = tuple(root / s for s in sorted(set(weight_map.values())))
    return Checkpoint(root, root / "config.json", shards, weight_map, root / T5_FILE, root / TOKENIZER_DIR,
                      root / VAE_FILE, root / WAV2VEC_DIR)


def iter_tensors(ckpt: Checkpoint):
    """(key, tensor) for every DiT tensor, one memory-mapped shard at a time."""
    by_shard: dict[str, list[str]] = {}
    for k, s in ckpt.weight_map.items():
        by_shard.setdefault(s, []).append(k)
    for shard, keys in sorted(by_shard.items()):
        tensors = mapped_tensors(ckpt.root / shard)
        for k in keys:
            if k not in tensors:
                raise CheckpointError(f"{ckpt.root / shard} lacks {k} that the index lists; re-download it")
            yield k, tensors.pop(k)


def load_dit(ckpt_dir, lora=None, lora_alpha: float | None = None, device="cpu",
             dtype=torch.bfloat16, quantized: dict | None = None):
    """Build the DiT on the meta device and assign the checkpoint's tensors (LoRA merged in fp32).

    quantized: module name -> scheme for a lowvram-quantized directory (their Linear layers become
    QuantLinear before assignment). Returns the model in eval mode on `device`."""
    from lowvram.model.dit import build_model

    ckpt = ckpt_dir if isinstance(ckpt_dir, Checkpoint) else discover(ckpt_dir)
    cfg = ckpt.dit_config()
    model = build_model(cfg, device="meta")
    if quantized:
        from lowvram.quantize.linear import apply_quant_layers

        apply_quant_layers(model, quantized)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    lora_set = None
    if lora is not None:
        from lowvram.io.lora import LoraSet

        lora_set = LoraSet.load(lora, alpha=lora_alpha)
        lora_set.check({k: s for k, s in ckpt.shapes().items() if k.endswith(".weight")})
    unexpected = sorted(set(ckpt.weight_map) - set(expected))
    if unexpected:
        raise CheckpointError(f"{ckpt.root}: {len(unexpected)} unexpected tensor(s) such as {unexpected[0]}; "
                              "this is not a Wan2.2-S2V-14B checkpoint")
    absent = sorted(set(expected) - set(ckpt.weight_map))
    if absent:
        raise CheckpointError(f"{ckpt.root}: {len(absent)} tensor(s) missing such as {absent[0]}; re-download it")
    state = {}
    for k, t in iter_tensors(ckpt):
        want_shape, want_dtype = expected[k]
        if tuple(t.shape) != want_shape:
            raise CheckpointError(f"{ckpt.root / ckpt.weight_map[k]}: {k} has shape {list(t.shape)}, "
                                  f"config.json implies {list(want_shape)}")
        if lora_set is not None and k in lora_set.targets:
            t = lora_set.merge(k, t.to(device))
        if t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn,) and not quantized_buffer(k, quantized):
            t = t.to(device=device, dtype=dtype)
        else:
            t = t.to(device)
        state[k] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def quantized_buffer(key: str, quantized: dict | None) -> bool:
    """Keys of QuantLinear buffers keep their stored dtype (int8/fp8 qweight, fp32 scale)."""
    if not quantized:
        return False
    mod, _, leaf = key.rpartition(".")
    return mod in quantized and leaf in ("qweight", "scale")
