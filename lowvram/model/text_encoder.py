"""umT5-XXL text encoder (encoder only) on transformers' `UMT5EncoderModel`, fed Wan's .pth.

Wan stores its own module names (docs/model.md §1.2, §2.2); `t5_key_map` renames them to transformers'
and the model is built on the meta device and given the memory-mapped tensors (no second
copy). Wan's feed-forward is `fc2(fc1(x) * gelu_tanh(gate(x)))`; transformers' gated one is
`wo(act(wi_0(x)) * wi_1(x))`, so gate -> wi_0, fc1 -> wi_1, fc2 -> wo. Both use per-layer
relative position bias (32 buckets, max distance 128), no 1/sqrt(d) scaling and RMS norm
with eps 1e-6.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import ftfy
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from lowvram.constants import T5_FILE, TOKENIZER_DIR
from lowvram.errors import CheckpointError, LowvramError
from lowvram.io.hf_folders import check_json_files, first_line, quiet_transformers

TEXT_LEN = 512
QUANTS = ("bf16", "int8", "nf4")
MAX_DISTANCE = 128

_BLOCK_KEYS = {  # Wan name inside `blocks.N.` -> transformers name inside `encoder.block.N.`
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # inside the GELU
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear factor
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def clean_text(s: str) -> str:
    """Wan's clean='whitespace': ftfy, HTML-unescape twice, collapse whitespace, strip."""
    s = html.unescape(html.unescape(ftfy.fix_text(s))).strip()
    # ftfy drops the controls \x1c-\x1f, the only characters where `re` and Wan's `regex` disagree on \s
    return re.sub(r"\s+", " ", s).strip()


def t5_key_map(wan_keys) -> dict[str, str]:
    """Map each Wan umT5 key to its `UMT5EncoderModel` name; CheckpointError on the first unknown key."""
    out = {}
    for k in wan_keys:
        if k in _TOP_KEYS:
            out[k] = _TOP_KEYS[k]
            continue
        m = _BLOCK_RE.fullmatch(k)
        if m is None or m.group(2) not in _BLOCK_KEYS:
            raise CheckpointError(f"key {k!r} is not a umT5 encoder key (expected Wan's {T5_FILE} layout)")
        out[k] = f"encoder.block.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"
    return out


def _expected_wan_keys(num_layers: int) -> list[str]:
    keys = list(_TOP_KEYS)
    keys += [f"blocks.{i}.{k}" for i in range(num_layers) for k in _BLOCK_KEYS]
    return keys


def t5_config(sd: dict[str, torch.Tensor]) -> UMT5Config:
    """The `UMT5Config` whose shapes match a Wan umT5 state dict (vocab, width, heads, FFN, layers)."""
    vocab, dim = sd["token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.fullmatch(k)))
    inner = sd["blocks.0.attn.q.weight"].shape[0]
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    cfg = UMT5Config(vocab_size=vocab, d_model=dim, d_kv=inner // heads, d_ff=sd["blocks.0.ffn.fc1.weight"].shape[0],
                     num_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
                     relative_attention_max_distance=MAX_DISTANCE, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    cfg._attn_implementation = "eager"  # the bias folds into the scores; softmax as Wan does it
    return cfg


def embedding_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean cosine similarity of two encode() results, token by token (for a quantized-vs-bf16 check)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("embedding_cosine needs two encode() results of the same prompts")
    cos = [F.cosine_similarity(x.float(), y.to(x.device).float(), dim=-1) for x, y in zip(a, b)]
    return torch.cat(cos).mean().item()


class TextEncoder:
    """Tokenizer + umT5 encoder; `encode` returns one [L_i, dim] tensor per prompt (L_i = real tokens)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, device: torch.device, text_len: int = TEXT_LEN,
                 quant: str = "bf16"):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.text_len, self.quant = text_len, quant

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()  # not inference_mode: callers may write into what comes back
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Encode prompts as Wan does: clean, pad to text_len, run, cut each output to its token count."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        tok = self.tokenizer([clean_text(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)  # [B, text_len]
        x = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, dim]
        return [u[:n] for u, n in zip(x, mask.sum(dim=1).tolist())]


def _torch_load(path: Path, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):
            return None  # a legacy (non-zip) file: it cannot be mapped, read it whole
        raise CheckpointError(f"{path} is not a readable PyTorch file ({str(e).splitlines()[0]}); "
                              "re-download it") from None
    except Exception as e:  # torch raises UnpicklingError, EOFError, zip errors... for a damaged file
        raise CheckpointError(f"{path} is not a readable PyTorch file ({type(e).__name__}); re-download it") from None


def _load_wan_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; copy {T5_FILE} of Wan2.2-S2V-14B into the checkpoint directory")
    sd = _torch_load(path, mmap=True)
    if sd is None:
        sd = _torch_load(path, mmap=False)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; re-download {T5_FILE}")
    return sd


def _check_keys(sd: dict, path: Path) -> dict[str, str]:
    try:
        kmap = t5_key_map(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if "token_embedding.weight" not in sd or not any(_BLOCK_RE.fullmatch(k) for k in sd):
        raise CheckpointError(f"{path} lacks token_embedding.weight or blocks.*; it is not Wan's {T5_FILE}")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.fullmatch(k)))
    missing = [k for k in _expected_wan_keys(layers) if k not in sd]
    if missing:
        raise CheckpointError(f"{path} lacks {missing[0]} ({len(missing)} keys missing); re-download {T5_FILE}")
    return kmap


def _drop_fp16_cast_notice(record: logging.LogRecord) -> bool:
    return "will be cast from" not in record.getMessage()


def _drop_kernels_hint(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def import_bitsandbytes():
    """bitsandbytes, imported with its load-time notice kept out of lowvram's output.

    On a CPU with AVX512-BF16, bitsandbytes' CPU backend tries to fetch a faster nf4 GEMM from the Hugging
    Face `kernels` package as it loads and, when that package is absent, logs a warning telling the user to
    `pip install kernels`; it then uses its own kernels, which is what lowvram wants. The filter sits on that
    module's logger before the import, so nothing else of bitsandbytes is hidden.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_hint)
    import bitsandbytes

    return bitsandbytes


def _quantize_linears(model: nn.Module, quant: str, device: torch.device, dtype: torch.dtype) -> None:
    """Swap the Linears of the encoder blocks for bitsandbytes ones, quantized as they move to `device`.

    int8 leaves `wo` in `dtype`: LLM.int8 quantizes activations through float16, and the input of
    T5's FFN output projection reaches past float16's range, so most of it would take the slow
    outlier path (transformers keeps `wo` out of 8-bit for T5 too: `_keep_in_fp32_modules`).
    nf4 computes in `dtype`, so it takes `wo` as well.
    """
    bnb = import_bitsandbytes()

    if quant == "int8":  # bitsandbytes warns on every call that it casts bf16 inputs to float16
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_fp16_cast_notice)
    for block in model.encoder.block:
        for parent in block.modules():
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear) or (quant == "int8" and name == "wo"):
                    continue
                w = lin.weight.data  # [out, in], still on the host (memory-mapped)
                if quant == "int8":
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                else:
                    # quant_storage=dtype: transformers casts wo's input to wo.weight.dtype, so it must not be uint8
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                          quant_type="nf4", quant_storage=dtype)
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=dtype)
                setattr(parent, name, q.to(device))


def _check_quant(quant: str, device: torch.device) -> None:
    if quant not in QUANTS:
        raise LowvramError(f"unknown --t5 {quant!r}; choose one of {', '.join(QUANTS)}")
    if quant == "bf16":
        return
    try:
        bnb = import_bitsandbytes()
    except ImportError:
        raise LowvramError(f"--t5 {quant} needs bitsandbytes; pip install bitsandbytes") from None
    major, minor = (int(p) for p in bnb.__version__.split(".")[:2])
    if device.type != "cuda" and (major, minor) < (0, 50):
        raise LowvramError(f"--t5 {quant} needs a CUDA GPU (or bitsandbytes >= 0.50 for the CPU); "
                           "use --t5 bf16 on this machine")


def load_text_encoder(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                      quant: str = "bf16", text_len: int = TEXT_LEN) -> TextEncoder:
    """Load Wan's umT5 encoder and tokenizer from `ckpt_dir` onto `device`.

    quant: "bf16" keeps the weights as stored (cast to `dtype`); "int8" (LLM.int8, threshold 6;
    the FFN output projections stay in `dtype`) or "nf4" quantize the encoder blocks' Linears
    with bitsandbytes while they move to `device`; embeddings and norms stay in `dtype`.
    """
    ckpt_dir, device = Path(ckpt_dir), torch.device(device)
    _check_quant(quant, device)
    path, tok_dir = ckpt_dir / T5_FILE, ckpt_dir / TOKENIZER_DIR
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; copy {T5_FILE} of Wan2.2-S2V-14B into the checkpoint directory")
    tokenizer = load_tokenizer(tok_dir)  # before the T5 file is read: a bad folder is named at once
    sd = _load_wan_state(path)
    kmap = _check_keys(sd, path)
    cfg = t5_config(sd)
    if len(tokenizer) > cfg.vocab_size:
        raise CheckpointError(f"{tok_dir} has {len(tokenizer)} tokens but {path} embeds only {cfg.vocab_size}; "
                              f"they are not a pair: re-download google/umt5-xxl and {T5_FILE}")
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    hf_sd = {kmap[k]: (v if v.dtype == dtype else v.to(dtype)) for k, v in sd.items()}
    try:
        res = model.load_state_dict(hf_sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch between layers
        raise CheckpointError(f"{path}: {str(e).splitlines()[-1].strip()}; re-download {T5_FILE}") from None
    left = [k for k in res.missing_keys if k != "encoder.embed_tokens.weight"]
    if left or res.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit the umT5 encoder ({(left + res.unexpected_keys)[0]})")
    model.encoder.embed_tokens.weight = model.shared.weight  # tied: one tensor, moved once
    model.eval().requires_grad_(False)
    if quant != "bf16":
        _quantize_linears(model, quant, device, dtype)
    model.to(device)
    return TextEncoder(model, tokenizer, device, text_len=text_len, quant=quant)


def load_tokenizer(tok_dir: Path):
    """The umT5 tokenizer of `tok_dir`, each of its files checked so that a damaged one is named."""
    what = "the google/umt5-xxl tokenizer folder"
    if not tok_dir.is_dir():
        raise CheckpointError(f"{tok_dir} is missing; copy the google/umt5-xxl tokenizer folder of Wan2.2-S2V-14B")
    check_json_files(tok_dir, what)
    fast = tok_dir / "tokenizer.json"
    if fast.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(fast))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise CheckpointError(f"{fast} is not a tokenizer ({first_line(e)}); re-download {what}") from None
    source = fast if fast.is_file() else tok_dir / "spiece.model"
    if not source.is_file():
        raise CheckpointError(f"{tok_dir} holds neither tokenizer.json nor spiece.model; re-download {what}")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as e:  # transformers' tokenizer loaders raise OSError, ValueError, KeyError, protobuf errors...
        raise CheckpointError(f"{source} does not load as a tokenizer "
                              f"({first_line(e)}); re-download {what}") from None
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"{tok_dir} defines no padding token (pad_token in special_tokens_map.json or "
                              f"tokenizer_config.json); re-download {what}")
    return tokenizer
