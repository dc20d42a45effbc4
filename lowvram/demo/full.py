"""The full-size synthetic checkpoint: every file of the real layout (brief §2.1) at the real shapes and
dtypes, with seeded random weights, written tensor by tensor (lowvram.demo.stream) so that host RAM stays
at a few pieces of 8-16 MiB whatever the file sizes.

Layout under `root` (as the reference's ckpt/ folder; file names from lowvram.constants):
    Wan2.2-S2V-14B/config.json                                   the S2V config values
    Wan2.2-S2V-14B/diffusion_pytorch_model.safetensors.index.json + -0000{1..4}-of-00004.safetensors
        bf16, the 1260 keys of `build_model(cfg, "meta")`, split as diffusers does (10 GB shards in module
        order: 9.97 / 9.89 / 9.96 / 2.77 GB at full size)
    Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth                umT5-xxl encoder in Wan's keys, bf16, a
        torch.save zip (5,680,910,336 params, 11.4 GB)
    Wan2.2-S2V-14B/google/umt5-xxl/                              a Unigram tokenizer of 256384 pieces
    Wan2.2-S2V-14B/Wan2.1_VAE.pth                                 fp32, dim 96, z_dim 16 (126.9 M params)
    Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/               Wav2Vec2ForCTC (315 M params, fp32)
    LiveAvatar/liveavatar.safetensors                             448 PEFT pairs, rank 128, alpha 64, bf16

`FullSpec.real()` is that checkpoint; `FullSpec.small()` keeps every key and layer count at tiny widths
for CPU tests. `write_full(root, spec, device="cuda")` makes the random numbers on a GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowvram.constants import INDEX_FILE, T5_FILE, TOKENIZER_DIR, VAE_FILE, WAV2VEC_DIR
from lowvram.demo.stream import (
    PIECE_ELEMS,
    Init,
    PthStream,
    RandomSource,
    SafetensorsStream,
    replace_when_done,
    rss_now,
    rss_peak,
    rss_reset,
)
from lowvram.model.config import DiTConfig

CKPT_NAME, LORA_NAME = "Wan2.2-S2V-14B", "LiveAvatar/liveavatar.safetensors"
DIT_SHARD_BYTES = 10 * 10**9  # diffusers' max_shard_size that gives the released 9.97/9.89/9.96/2.77 GB
STAMP = ".lowvram-full.json"  # what was written, for resuming

REAL_DIT = {  # config.json of Wan2.2-S2V-14B (brief §1.1)
    "_class_name": "WanModel_S2V", "model_type": "s2v", "dim": 5120, "ffn_dim": 13824, "freq_dim": 256,
    "num_heads": 40, "num_layers": 40, "in_dim": 16, "out_dim": 16, "text_len": 512, "patch_size": [1, 2, 2],
    "eps": 1e-6, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "enable_adain": True,
    "adain_mode": "attn_norm", "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39],
    "zero_init": True, "zero_timestep": True, "enable_motioner": False, "add_last_motion": True,
    "enable_tsm": False, "enable_framepack": True, "framepack_drop_mode": "padd", "audio_dim": 1024,
    "motion_frames": 73, "cond_dim": 16,
}
REAL_WAV2VEC = {  # config.json of jonatasgrosman/wav2vec2-large-xlsr-53-english (brief §1.4)
    "vocab_size": 33, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": True, "feat_extract_norm": "layer",
    "do_stable_layer_norm": True, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "hidden_act": "gelu", "feat_extract_activation": "gelu", "layer_norm_eps": 1e-5, "mask_time_prob": 0.05,
    "layerdrop": 0.05, "hidden_dropout": 0.05, "feat_proj_dropout": 0.05, "attention_dropout": 0.1,
    "activation_dropout": 0.05, "ctc_loss_reduction": "mean", "ctc_zero_infinity": True, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2, "architectures": ["Wav2Vec2ForCTC"],
}
_W2V_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", "-"] + list(string.ascii_uppercase)  # 33 CTC labels


@dataclass(frozen=True)
class FullSpec:
    dit: dict
    t5_vocab: int = 256384
    t5_dim: int = 4096
    t5_heads: int = 64
    t5_ffn: int = 10240
    t5_layers: int = 24
    t5_buckets: int = 32
    vae_dim: int = 96
    vae_z: int = 16
    w2v: dict = field(default_factory=lambda: dict(REAL_WAV2VEC))
    lora_rank: int = 128
    lora_alpha: float = 64.0
    shard_bytes: int | None = None  # None: DIT_SHARD_BYTES scaled by the DiT's size against the real one

    @classmethod
    def real(cls) -> "FullSpec":
        return cls(dit=dict(REAL_DIT))

    @classmethod
    def small(cls, t5_dim: int = 64, num_layers: int = 40) -> "FullSpec":
        """Every key, layer and file of the real checkpoint (1260 DiT keys, 24 T5 and wav2vec2 layers, the real
        vocabulary) at tiny widths: a CPU writes it in seconds. t5_dim sets the T5 embedding's size; fewer
        DiT layers (audio injected at the first, middle and last) make a CPU run of it quick."""
        inject = REAL_DIT["audio_inject_layers"] if num_layers == 40 else sorted({0, num_layers // 2, num_layers - 1})
        dit = {**REAL_DIT, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "num_heads": 2, "audio_dim": 32,
               "text_dim": t5_dim, "num_layers": num_layers, "audio_inject_layers": inject}
        w2v = {**REAL_WAV2VEC, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
               "conv_dim": [16] * 7}
        return cls(dit=dit, t5_dim=t5_dim, t5_heads=2, t5_ffn=2 * t5_dim, vae_dim=8, w2v=w2v, lora_rank=4,
                   lora_alpha=2.0)

    def dit_config(self) -> DiTConfig:
        """The config the loader derives: config.json + wav2vec2's hidden states (from the weight's shape)."""
        return DiTConfig.from_dict({**self.dit, "num_audio_layers": self.w2v["num_hidden_layers"] + 1})

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# ---- the tensors of each file: name -> (shape, dtype), in file order, and each tensor's distribution


def dit_entries(spec: FullSpec) -> dict:
    """Every DiT key in module order with its shape, from the model built on the meta device (bf16)."""
    from lowvram.model.dit import build_model

    return {k: (tuple(v.shape), torch.bfloat16) for k, v in build_model(spec.dit_config(), "meta").state_dict().items()}


def dit_shards(entries: dict, shard_bytes: int) -> list[list[str]]:
    """diffusers' split: keys in module order, a new shard when the next tensor would pass shard_bytes."""
    shards, cur, size = [], [], 0
    for k, (shape, dtype) in entries.items():
        n = math.prod(shape) * dtype.itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    return shards + [cur] if cur else shards


def shard_bytes_for(spec: FullSpec, entries: dict) -> int:
    if spec.shard_bytes is not None:
        return spec.shard_bytes
    real = 16_295_755_609 * 2  # the released DiT's bf16 bytes
    total = sum(math.prod(s) * d.itemsize for s, d in entries.values())
    return max(1, round(DIT_SHARD_BYTES * total / real))


def dit_init(key: str, shape: tuple) -> Init:
    """N(0, 1/fan_in) matrices and convs, norm gains 1 ± 0.05, the rest 0.05 (the scales tools/bench.py runs)."""
    if key.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
        return Init(0.05, 1.0)
    if key.endswith("weight") and len(shape) >= 2:
        return Init(math.prod(shape[1:]) ** -0.5)
    return Init(0.05)


_T5_BLOCK = ("norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "norm2.weight",
             "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight", "pos_embedding.embedding.weight")


def t5_entries(spec: FullSpec) -> dict:
    """Wan's umT5 encoder keys (module order of its T5Encoder) and shapes, bf16."""
    d, f, bf = spec.t5_dim, spec.t5_ffn, torch.bfloat16
    shapes = {"norm1.weight": (d,), "attn.q.weight": (d, d), "attn.k.weight": (d, d), "attn.v.weight": (d, d),
              "attn.o.weight": (d, d), "norm2.weight": (d,), "ffn.gate.0.weight": (f, d), "ffn.fc1.weight": (f, d),
              "ffn.fc2.weight": (d, f), "pos_embedding.embedding.weight": (spec.t5_buckets, spec.t5_heads)}
    out = {"token_embedding.weight": ((spec.t5_vocab, d), bf)}
    for i in range(spec.t5_layers):
        out.update({f"blocks.{i}.{k}": (shapes[k], bf) for k in _T5_BLOCK})
    out["norm.weight"] = ((d,), bf)
    return out


def t5_init(key: str, shape: tuple) -> Init:
    if key == "token_embedding.weight":
        return Init(1.0)
    if key.endswith("pos_embedding.embedding.weight"):
        return Init(0.5)
    if len(shape) == 1:  # RMS norm gains
        return Init(0.1, 1.0)
    return Init(shape[1] ** -0.5)


def vae_entries(spec: FullSpec) -> dict:
    from lowvram.model.vae import VAEConfig, WanVAE

    with torch.device("meta"):
        model = WanVAE(VAEConfig(dim=spec.vae_dim, z_dim=spec.vae_z))
    return {k: (tuple(v.shape), torch.float32) for k, v in model.state_dict().items()}


def vae_init(key: str, shape: tuple) -> Init:
    """As lowvram.demo.components.write_tiny_vae: unit-scale convs, a damped head and attention output."""
    if key.endswith("gamma"):
        return Init(0.1, 1.0)
    if key.endswith("bias"):
        return Init(0.02)
    gain = 0.3 if key.startswith("decoder.head") or key.endswith("proj.weight") else 1.0
    return Init(gain / math.sqrt(math.prod(shape[1:])))


def _w2v_config(spec: FullSpec):
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(**spec.w2v)


def w2v_entries(spec: FullSpec) -> dict:
    """Wav2Vec2ForCTC's keys (built on the meta device), the weight-normed conv under the released file's
    names weight_g / weight_v (transformers renames them at load), fp32."""
    from transformers import Wav2Vec2ForCTC

    with torch.device("meta"):
        model = Wav2Vec2ForCTC(_w2v_config(spec))
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                               "weight_v")
        out[k] = (tuple(v.shape), torch.float32)
    return out


def w2v_init(key: str, shape: tuple, entries: dict) -> Init:
    if key.endswith("weight_g"):  # g = |v| per tap, so that g * v / |v| keeps v's N(0, 1/fan_in) scale
        v_shape = entries[key[: -len("weight_g")] + "weight_v"][0]
        g = math.sqrt(v_shape[0] / v_shape[2])
        return Init(0.01 * g, g)
    if "layer_norm.weight" in key:
        return Init(0.1, 1.0)
    if key.endswith("bias") or len(shape) == 1:
        return Init(0.02)
    return Init(math.prod(shape[1:]) ** -0.5)


def lora_entries(spec: FullSpec, dit: dict) -> dict:
    """PEFT pairs for every 2-D weight PEFT would wrap (448 at full size): A [r, in], B [out, r], bf16."""
    from lowvram.io.lora import lora_target_keys

    out = {}
    for key in lora_target_keys(list(dit)):
        shape = dit[key][0]
        if len(shape) != 2:
            continue
        mod = key[: -len(".weight")]
        out[f"base_model.model.{mod}.lora_A.default.weight"] = ((spec.lora_rank, shape[1]), torch.bfloat16)
        out[f"base_model.model.{mod}.lora_B.default.weight"] = ((shape[0], spec.lora_rank), torch.bfloat16)
    return out


def lora_init(key: str, shape: tuple) -> Init:
    return Init(shape[1] ** -0.5) if ".lora_A." in key else Init(0.02)  # B small but not PEFT's zero start


# ---- the small files


def write_tokenizer(out_dir: Path, vocab_size: int, seed: int = 0) -> int:
    """A Unigram tokenizer with T5's special ids (pad 0, eos 1, unk 2) and exactly `vocab_size` pieces.

    The real pieces are the words and characters of lowvram.demo.components' text plus printable ASCII; the
    rest are fillers no text produces. Pieces are placed at seeded random ids over the whole vocabulary, so
    that prompts reach embedding rows anywhere in the table. Returns the tokenizer's size.
    """
    from lowvram.demo.components import save_unigram_tokenizer, text_pieces

    real = text_pieces(string.ascii_letters + string.digits + string.punctuation)
    if len(real) + 3 > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(real) + 3} pieces of the built-in text")
    body = real + [(f"<filler_{i}>", -100.0) for i in range(vocab_size - 3 - len(real))]
    random.Random(seed).shuffle(body)
    return save_unigram_tokenizer(out_dir, body)


def write_w2v_side_files(folder: Path, spec: FullSpec) -> None:
    """config.json, preprocessor_config.json and the CTC vocabulary of the wav2vec2 folder."""
    from transformers import Wav2Vec2FeatureExtractor

    _w2v_config(spec).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    vocab = {t: i for i, t in enumerate(_W2V_VOCAB[: spec.w2v["vocab_size"]])}
    (folder / "vocab.json").write_text(json.dumps(vocab))


# ---- writing


def plan_files(spec: FullSpec) -> list[dict]:
    """The tensor files of the checkpoint: relative path, format, entries and their init, in writing order."""
    dit = dit_entries(spec)
    out = []
    shards = dit_shards(dit, shard_bytes_for(spec, dit))
    for i, keys in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        out.append({"file": f"{CKPT_NAME}/{name}", "format": "safetensors", "entries": {k: dit[k] for k in keys},
                    "init": dit_init, "metadata": {"format": "pt"}, "dit_shard": True})
    t5 = t5_entries(spec)
    out.append({"file": f"{CKPT_NAME}/{T5_FILE}", "format": "pth", "entries": t5, "init": t5_init})
    out.append({"file": f"{CKPT_NAME}/{VAE_FILE}", "format": "pth", "entries": vae_entries(spec), "init": vae_init})
    w2v = w2v_entries(spec)
    out.append({"file": f"{CKPT_NAME}/{WAV2VEC_DIR}/model.safetensors", "format": "safetensors", "entries": w2v,
                "init": lambda k, s: w2v_init(k, s, w2v), "metadata": {"format": "pt"}})
    out.append({"file": LORA_NAME, "format": "safetensors", "entries": lora_entries(spec, dit), "init": lora_init,
                "metadata": {"lora_alpha": repr(float(spec.lora_alpha)), "lora_rank": str(spec.lora_rank)}})
    return out


def file_bytes(f: dict) -> int:
    return sum(math.prod(s) * d.itemsize for s, d in f["entries"].values())


def _write_tensor_file(path: Path, f: dict, src: RandomSource) -> None:
    stream = (SafetensorsStream(path, f["entries"], f.get("metadata")) if f["format"] == "safetensors"
              else PthStream(path, f["entries"], archive=Path(f["file"]).stem))
    for name in stream.order:
        shape, dtype = f["entries"][name]
        stream.write(name, src.pieces(f"{f['file']}:{name}", math.prod(shape), dtype, f["init"](name, shape)))
    stream.close()


def _load_stamp(root: Path, ident: dict) -> dict:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp.get("files", {}) if stamp.get("ident") == ident else {}


def _where(root: Path, f: dict, shard_dir) -> tuple[Path, Path]:
    """(name in the checkpoint, where the bytes go): DiT shards may live in shard_dir behind a symlink."""
    target = root / f["file"]
    return target, (Path(shard_dir) / target.name if f.get("dit_shard") and shard_dir is not None else target)


def write_full(root, spec: FullSpec | None = None, seed: int = 0, device="cpu", shard_dir=None, resume: bool = False,
               piece_elems: int | None = None, threads: int | None = None, dry_run: bool = False,
               log=print) -> dict:
    """Write the checkpoint under root; returns a report (files, bytes, seconds, peak RSS per file).

    device: where the random numbers are made ("cuda" makes them on the GPU; the bytes differ per device
    type). shard_dir: write the DiT shards there and symlink them into the checkpoint (e.g. a tmpfs while
    the rest goes to disk). resume: keep files a previous call with the same spec, seed, device and piece
    size wrote (the stamp file records them). dry_run: only report what would be written (and kept).
    """
    spec = spec or FullSpec.real()
    root, device = Path(root), torch.device(device)
    ckpt = root / CKPT_NAME
    piece_elems = piece_elems or PIECE_ELEMS
    # what the bytes depend on
    ident = {"spec": spec.key(), "seed": seed, "device": device.type, "piece_elems": piece_elems}
    done = _load_stamp(root, ident) if resume else {}
    t_all = time.perf_counter()
    report = {"root": str(root), "spec": dataclasses.asdict(spec), "seed": seed, "device": device.type,
              "rss_reset": rss_reset(), "start_rss_bytes": rss_now(), "dry_run": dry_run, "files": [],
              "ckpt_dir": str(ckpt), "lora": str(root / LORA_NAME)}
    rss_reset()
    files = plan_files(spec)  # the meta-device models: key lists and shapes, no tensor data
    report["files"].append({"file": "(plan: meta models)", "bytes": 0, "seconds": round(time.perf_counter() - t_all, 3),
                            "peak_rss_bytes": rss_peak()})
    if not dry_run:
        t0 = time.perf_counter()
        rss_reset()
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "config.json").write_text(json.dumps(spec.dit, indent=2) + "\n")
        tok_dir = ckpt / TOKENIZER_DIR
        if not (TOKENIZER_DIR in done and (tok_dir / "tokenizer.json").is_file()):
            tok_dir.mkdir(parents=True, exist_ok=True)
            write_tokenizer(tok_dir, spec.t5_vocab, seed)
            done[TOKENIZER_DIR] = 0
        (ckpt / WAV2VEC_DIR).mkdir(parents=True, exist_ok=True)
        write_w2v_side_files(ckpt / WAV2VEC_DIR, spec)
        report["files"].append({"file": f"{CKPT_NAME}/{TOKENIZER_DIR} + small files", "bytes": 0,
                                "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": rss_peak()})
    src = None if dry_run else RandomSource(seed, device, piece_elems=piece_elems, threads=threads)
    weight_map = {k: _where(root, f, shard_dir)[0].name for f in files if f.get("dit_shard") for k in f["entries"]}
    try:
        for f in files:
            target, path = _where(root, f, shard_dir)
            keep = bool(done.get(f["file"])) and path.is_file() and path.stat().st_size == done[f["file"]]
            if keep or dry_run:
                report["files"].append({"file": f["file"], "bytes": file_bytes(f), "skipped": keep,
                                        "path": str(path)})
                if keep:
                    _link(target, path)
                continue
            t0, before = time.perf_counter(), rss_now()
            rss_reset()
            path.parent.mkdir(parents=True, exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            part, commit = replace_when_done(path)
            _write_tensor_file(part, f, src)
            commit()
            _link(target, path)
            done[f["file"]] = size = path.stat().st_size
            (root / STAMP).write_text(json.dumps({"ident": ident, "files": done}, indent=1))
            sec = time.perf_counter() - t0
            report["files"].append({"file": f["file"], "path": str(path), "bytes": size, "tensor_bytes": file_bytes(f),
                                    "seconds": round(sec, 3), "rss_before_bytes": before, "peak_rss_bytes": rss_peak()})
            log(f"wrote {f['file']}: {size / 1e9:.2f} GB in {sec:.1f} s ({size / max(sec, 1e-9) / 1e9:.2f} GB/s)")
    finally:
        if src is not None:
            src.close()
    total = sum(file_bytes(f) for f in files if f.get("dit_shard"))
    if not dry_run:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (ckpt / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    report.update(seconds=round(time.perf_counter() - t_all, 3), dit_total_size=total,
                  bytes=sum(r["bytes"] for r in report["files"]),
                  written_bytes=sum(r["bytes"] for r in report["files"] if "rss_before_bytes" in r),
                  peak_rss_bytes=max(r.get("peak_rss_bytes", 0) for r in report["files"]))
    return report


def _link(target: Path, real_path: Path) -> None:
    """Make target name real_path (a symlink when the DiT shards live elsewhere)."""
    if target == real_path:
        return
    if target.is_symlink() or target.exists():
        target.unlink()
    os.symlink(real_path.resolve(), target)
