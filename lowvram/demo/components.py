"""Seeded random stand-ins for the checkpoint's components at tiny sizes, each in the real file layout:
the umT5 encoder (Wan's .pth keys) and its tokenizer, wav2vec2 (a transformers folder), the Wan2.1 VAE
(.pth) and the LiveAvatar LoRA (PEFT, plain or kohya spellings). `lowvram.demo.tiny` puts them together."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowvram.constants import AUDIO_RATE, T5_FILE, TOKENIZER_DIR, WAV2VEC_DIR
from lowvram.io.lora import LIVEAVATAR_TARGETS, lora_target_keys
from lowvram.model.text_encoder import TEXT_LEN
from lowvram.model.vae import VAEConfig, WanVAE

_TINY_TEXT = """\
A young woman with short dark hair sits in front of a bright window and talks to the camera.
She smiles, nods and moves her hands while she explains how the old bridge over the river was
built. An elderly man in a grey coat reads a newspaper on a wooden bench in a quiet park; birds
sing, leaves fall and a child runs after a red ball. The presenter in the studio wears a blue
shirt and looks straight ahead, speaking calmly about the weather, the rain in the north and the
sunny afternoon expected in the south. A singer with long curly hair closes her eyes and sings a
slow song, the light is warm and soft, the background is blurred. Two friends laugh at a small
table in a busy cafe, cups of coffee steam, people walk past the glass door. The teacher points
at the board and asks a question; the students raise their hands. A boy with glasses tells a
story about his dog, his voice is clear and his face is lively. The news anchor reads the
headlines: markets open higher, a new train line opens next week, the museum shows paintings
from the last century. A chef in a white jacket cuts vegetables and describes every step of the
recipe with care. The camera is still, the frame shows the head and shoulders, the expression
changes naturally with the speech, eyes blink, lips move in sync with the words.
"""


def text_pieces(extra_chars: str = "") -> list[tuple[str, float]]:
    """Unigram pieces of the built-in text: its words and characters (and `extra_chars`, counted once more),
    scored by their log frequency and sorted best first. No trainer, so they are the same on every run."""
    from collections import Counter

    words = Counter(re.findall(r"\w+|[^\w\s]", _TINY_TEXT))
    chars = Counter(c for w, n in words.items() for c in w * n)
    if extra_chars:
        chars.update({c: 1 for c in extra_chars})
    total = sum(words.values()) + sum(chars.values())
    pieces = {"\u2581": math.log(sum(words.values()) / total)}
    for c, n in chars.items():  # inside a word, and opening one
        pieces[c] = pieces["\u2581" + c] = math.log(n / total) - 2.0
    for w, n in words.items():
        pieces["\u2581" + w] = math.log(n / total)
    return sorted(((p, round(v, 6)) for p, v in pieces.items()), key=lambda pv: (-pv[1], pv[0]))


def save_unigram_tokenizer(out_dir: Path, pieces: list[tuple[str, float]]) -> int:
    """A fast Unigram tokenizer with T5's special ids (pad 0, eos 1, unk 2) then `pieces`, saved as the
    checkpoint's tokenizer folder; returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(pieces), unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LEN)
    fast.save_pretrained(out_dir)
    # the class name every transformers version knows (5.x would write its own "TokenizersBackend")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return tok.get_vocab_size()


def _tiny_tokenizer(out_dir: Path) -> int:
    """The tiny checkpoint's tokenizer: the built-in text's pieces only; returns its size."""
    return save_unigram_tokenizer(out_dir, text_pieces())


def write_tiny_t5(ckpt_dir: str | Path, seed: int = 0, dim: int = 32, heads: int = 2, ffn: int = 64,
                  layers: int = 2, num_buckets: int = 32) -> Path:
    """Write a random umT5 encoder in Wan's key layout (bf16 .pth) and a tiny tokenizer under `ckpt_dir`."""
    ckpt_dir = Path(ckpt_dir)
    vocab = _tiny_tokenizer(ckpt_dir / TOKENIZER_DIR)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(torch.bfloat16)

    sd = {"token_embedding.weight": rnd(vocab, dim)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = rnd(dim, std=0.1, mean=1.0)
        for n in "qkvo":
            sd[p + f"attn.{n}.weight"] = rnd(dim, dim, std=dim ** -0.5)
        sd[p + "norm2.weight"] = rnd(dim, std=0.1, mean=1.0)
        sd[p + "ffn.gate.0.weight"] = rnd(ffn, dim, std=dim ** -0.5)
        sd[p + "ffn.fc1.weight"] = rnd(ffn, dim, std=dim ** -0.5)
        sd[p + "ffn.fc2.weight"] = rnd(dim, ffn, std=ffn ** -0.5)
        sd[p + "pos_embedding.embedding.weight"] = rnd(num_buckets, heads, std=0.5)
    sd["norm.weight"] = rnd(dim, std=0.1, mean=1.0)
    path = ckpt_dir / T5_FILE
    torch.save(sd, path)
    return path



def write_tiny_wav2vec2(ckpt_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a random wav2vec2 with the real model's structure at tiny sizes (320 samples per frame)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder = Path(ckpt_dir) / WAV2VEC_DIR
    cfg = Wav2Vec2Config(
        vocab_size=12, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, conv_dim=[16] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.05, layerdrop=0.05,
        hidden_dropout=0.05, feat_proj_dropout=0.05, attention_dropout=0.1, activation_dropout=0.05,
        architectures=["Wav2Vec2ForCTC"])
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(cfg)
    with torch.no_grad():  # biases and norms away from their 0/1 init, so that every weight matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=AUDIO_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(folder)
    return folder



def write_tiny_vae(path, seed: int = 0, dim: int = 8, z_dim: int = 16) -> Path:
    """Write a small random VAE checkpoint in the Wan2.1 layout (fp32 state dict, `.pth`).

    Conv weights are N(0, 1/fan_in) so activations keep unit scale through the norms; the
    attention output and the decoder head are scaled down so decoded frames are not saturated.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = WanVAE(VAEConfig(dim=dim, z_dim=z_dim))
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("gamma"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = math.prod(p.shape[1:])
            gain = 0.3 if name.startswith("decoder.head") or name.endswith("proj.weight") else 1.0
            t = gain * torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        sd[name] = t.float().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path



def write_tiny_lora(path, base_shapes: dict[str, tuple], rank: int = 4, seed: int = 0, spelling: str = "peft",
                    alpha: float = 2.0, targets=LIVEAVATAR_TARGETS) -> list[str]:
    """Write a seeded random LoRA for the 2-D weights of `base_shapes` that PEFT would target.

    spelling: "peft" (`base_model.model.<m>.lora_A.default.weight`), "plain" (`<m>.lora_A.weight`) or
    "kohya" (`<m>.lora_down.weight` / `lora_up`). alpha is stored as header metadata `lora_alpha`
    (default 2.0 = rank 4 at LiveAvatar's scale 0.5). Returns the targeted weight keys.
    """
    fmt = {"peft": ("base_model.model.{m}.lora_A.default.weight", "base_model.model.{m}.lora_B.default.weight"),
           "plain": ("{m}.lora_A.weight", "{m}.lora_B.weight"),
           "kohya": ("{m}.lora_down.weight", "{m}.lora_up.weight")}
    if spelling not in fmt:
        raise ValueError(f"spelling must be one of {sorted(fmt)}, not {spelling!r}")
    g = torch.Generator().manual_seed(seed)
    keys = [k for k in lora_target_keys(sorted(base_shapes), targets) if len(base_shapes[k]) == 2]
    tensors = {}
    for key in keys:
        out_f, in_f = base_shapes[key]
        mod = key[: -len(".weight")]
        # Trained adapters: A ~ kaiming-uniform-like, B small but non-zero (PEFT starts B at 0).
        tensors[fmt[spelling][0].format(m=mod)] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).bfloat16()
        tensors[fmt[spelling][1].format(m=mod)] = (torch.randn(out_f, rank, generator=g) * 0.02).bfloat16()
    save_file(tensors, str(path), metadata={"lora_alpha": repr(float(alpha)), "lora_rank": str(rank)})
    return keys


def write_tiny_taehv(path, seed: int = 0, dtype: torch.dtype = torch.float32, with_encoder: bool = True) -> Path:
    """Write random TAEHV weights for Wan 2.1 latents in the public `taew2_1` key layout (.pth, or
    .safetensors by suffix). The design's widths are fixed (256/128/64), so this is full size (~10 M
    decoder parameters); `with_encoder` adds the public encoder's keys, which the loader must ignore.
    Convs are N(0, 1/fan_in), the last conv of each MemBlock halved, the output conv biased to mid-grey."""
    from lowvram.model.taehv import TAEHVDecoder

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = TAEHVDecoder()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if with_encoder:  # the public encoder: conv, ReLU, then 3 x (TPool, strided conv, 3 MemBlocks), conv -> 16
        shapes.update({"encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,), "encoder.17.weight": (16, 64, 3, 3),
                       "encoder.17.bias": (16,)})
        for i, stride in ((2, 2), (7, 2), (12, 1)):
            shapes[f"encoder.{i}.conv.weight"] = (64, 64 * stride, 1, 1)
            shapes[f"encoder.{i + 1}.weight"] = (64, 64, 3, 3)
            for j in range(i + 2, i + 5):
                for k, c_in in ((0, 128), (2, 64), (4, 64)):
                    shapes[f"encoder.{j}.conv.{k}.weight"] = (64, c_in, 3, 3)
                    shapes[f"encoder.{j}.conv.{k}.bias"] = (64,)
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("bias"):
            t = torch.full(shape, 0.5) if name == "decoder.22.bias" else 0.02 * torch.randn(shape, generator=gen)
        else:
            gain = 0.5 if name.endswith("conv.4.weight") else 0.3 if name == "decoder.22.weight" else 1.0
            t = gain * torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        sd[name] = t.to(dtype).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path
