"""umT5 text encoder: Wan key map, equivalence with an independent Wan-formula encoder, cutting, errors."""

import math
from pathlib import Path

import pytest
import torch

from lowvram.constants import T5_FILE, TOKENIZER_DIR
from lowvram.demo.components import write_tiny_t5
from lowvram.errors import CheckpointError, LowvramError
from lowvram.model.text_encoder import (
    clean_text,
    embedding_cosine,
    load_text_encoder,
    t5_key_map,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("t5")
    write_tiny_t5(d, seed=3)
    return d


@pytest.fixture(scope="module")
def enc32(tiny):
    return load_text_encoder(tiny, dtype=torch.float32)


def _wan_sd(d: Path) -> dict:
    return torch.load(d / T5_FILE, weights_only=True)


# --- an independent Wan umT5 encoder, written from Wan's formulas (t5.py), float32 ---------------

def _wan_bucket(rel: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    # rel = key position - query position; bidirectional: half the buckets for rel > 0
    half = num_buckets // 2
    base = (rel > 0).long() * half
    r = rel.abs()
    exact = half // 2
    large = exact + (torch.log(r.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return base + torch.where(r < exact, r, large)


def _wan_encoder(sd: dict, ids: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    sd = {k: v.float() for k, v in sd.items()}
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    heads = sd["blocks.0.pos_embedding.embedding.weight"].shape[1]
    b, n = ids.shape

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # [Lq, Lk]
    buckets = _wan_bucket(rel)
    x = sd["token_embedding.weight"][ids]  # [B, L, C]
    for i in range(layers):
        p = f"blocks.{i}."
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]  # [1, H, Lq, Lk]
        bias = bias.expand(b, -1, -1, -1).masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{c}.weight"].T for c in "qkv")
        q, k, v = (t.view(b, n, heads, -1) for t in (q, k, v))  # [B, L, H, d]
        att = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d)
        o = torch.einsum("bnij,bjnc->binc", att.softmax(-1), v).reshape(b, n, -1)
        x = x + o @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        f = (h @ sd[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)
        x = x + f @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_bucket_function_corners():
    rel = torch.tensor([0, 1, -1, 7, -7, 8, 200, -200, 127, -127])
    assert _wan_bucket(rel).tolist() == [0, 17, 1, 23, 7, 24, 31, 15, 31, 15]


def test_every_key_mapped_and_every_parameter_filled(tiny, enc32):
    sd = _wan_sd(tiny)
    kmap = t5_key_map(sd)
    assert set(kmap) == set(sd)
    params = dict(enc32.model.named_parameters())
    assert set(kmap.values()) == set(params)  # embed_tokens is tied to shared, so named once
    assert enc32.model.encoder.embed_tokens.weight is enc32.model.shared.weight
    for k, hk in kmap.items():
        assert torch.equal(params[hk], sd[k].float()), k
    assert enc32.model.config.num_layers == 2 and enc32.model.config.num_heads == 2


def test_matches_wan_formulas_with_padding(tiny, enc32):
    g = torch.Generator().manual_seed(11)
    vocab = enc32.model.config.vocab_size
    lens = [150, 97, 5]  # > 128 reaches the far log buckets
    ids = torch.randint(3, vocab, (3, 150), generator=g)
    mask = (torch.arange(150)[None] < torch.tensor(lens)[:, None]).long()
    ids = ids * mask  # pad id 0
    with torch.no_grad():
        got = enc32.model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = _wan_encoder(_wan_sd(tiny), ids, mask)
    for i, n in enumerate(lens):
        torch.testing.assert_close(got[i, :n], want[i, :n], rtol=1e-5, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-3  # different inputs, different outputs


def test_encode_cuts_to_real_length(tiny, enc32):
    prompts = ["A woman talks to the camera.", "  The chef   cuts vegetables &amp;amp; smiles  ", "x"]
    out = enc32.encode(prompts)
    for p, o in zip(prompts, out):
        n = len(enc32.tokenizer(clean_text(p)).input_ids)
        assert o.shape == (n, 32)
        assert enc32.tokenizer(clean_text(p)).input_ids[-1] == 1  # eos appended
    ids = enc32.tokenizer([clean_text(prompts[1])], padding="max_length", max_length=512,
                          return_tensors="pt").input_ids
    mask = (ids != 0).long()
    full = _wan_encoder(_wan_sd(tiny), ids, mask)[0]
    torch.testing.assert_close(out[1], full[: out[1].shape[0]], rtol=1e-5, atol=1e-5)


def test_truncation_to_text_len(tiny):
    enc = load_text_encoder(tiny, dtype=torch.float32, text_len=9)
    out = enc.encode(["the teacher points at the board and asks a question while the students raise hands"])
    assert out[0].shape == (9, 32)
    assert enc.encode([]) == []
    out[0][:2] = 0  # plain tensors (not inference-mode ones): the caller may write into them


def test_bf16_load_keeps_the_file_mapped(tiny):
    enc = load_text_encoder(tiny)  # bf16 as stored: parameters point into the memory-mapped .pth
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    ranges = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in maps.read_text().splitlines()
              if line.rstrip().endswith(str(tiny / T5_FILE))]
    ptr = enc.model.shared.weight.data_ptr()
    assert enc.model.shared.weight.dtype == torch.bfloat16
    assert any(lo <= ptr < hi for lo, hi in ranges)


@pytest.mark.parametrize("s,want", [
    ("  a \t\n  b  ", "a b"),
    ("fish &amp;amp; chips", "fish & chips"),
    ("cafÃ© time", "café time"),
    ("x\u3000y\u00a0z", "x y z"),
    ("", ""),
])
def test_clean_text(s, want):
    assert clean_text(s) == want


@pytest.mark.parametrize("quant,floor", [("int8", 0.99), ("nf4", 0.9)])
def test_bitsandbytes_quant_on_cpu(tmp_path, quant, floor):
    pytest.importorskip("bitsandbytes")
    # 64 wide: bitsandbytes' CPU nf4 dequantization is wrong for in_features < 64 (0.50.2)
    write_tiny_t5(tmp_path, seed=5, dim=64, heads=4, ffn=128, layers=2)
    prompts = ["A singer closes her eyes and sings a slow song.", "Two friends laugh"]
    ref = load_text_encoder(tmp_path).encode(prompts)
    enc = load_text_encoder(tmp_path, quant=quant)
    qtype = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[quant]
    ffn = enc.model.encoder.block[1].layer[1].DenseReluDense
    assert type(ffn.wi_0).__name__ == type(enc.model.encoder.block[0].layer[0].SelfAttention.o).__name__ == qtype
    assert type(ffn.wo).__name__ == ("Linear" if quant == "int8" else qtype)  # int8 would cast wo's input to fp16
    got = enc.encode(prompts)
    cos = embedding_cosine(ref, got)
    assert floor < cos < 1.0


def test_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=T5_FILE):
        load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(LowvramError, match="fp8"):
        load_text_encoder(tiny, quant="fp8")

    def copy_with(sd_or_obj, name="c"):
        d = tmp_path / name
        (d / TOKENIZER_DIR).mkdir(parents=True)
        for f in (tiny / TOKENIZER_DIR).iterdir():
            (d / TOKENIZER_DIR / f.name).write_bytes(f.read_bytes())
        torch.save(sd_or_obj, d / T5_FILE)
        return d

    with pytest.raises(CheckpointError, match="not a state dict"):
        load_text_encoder(copy_with(torch.ones(3), "tensor"))
    d = copy_with({}, "garbage")
    (d / T5_FILE).write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_text_encoder(d)
    sd = _wan_sd(tiny)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.bias"):
        load_text_encoder(copy_with({**sd, "blocks.0.attn.bias": torch.ones(2)}, "extra"))
    sd_missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.fc1.weight"}
    with pytest.raises(CheckpointError, match=r"lacks blocks\.1\.ffn\.fc1\.weight"):
        load_text_encoder(copy_with(sd_missing, "missing"))
    bad = dict(sd)
    bad["blocks.1.ffn.fc2.weight"] = torch.ones(32, 60, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="re-download"):
        load_text_encoder(copy_with(bad, "shape"))
    d = copy_with(sd, "notok")
    for f in (d / TOKENIZER_DIR).iterdir():
        f.unlink()
    (d / TOKENIZER_DIR).rmdir()
    with pytest.raises(CheckpointError, match="umt5-xxl"):
        load_text_encoder(d)
    with pytest.raises(CheckpointError, match="not a umT5 encoder key"):
        t5_key_map(["encoder.block.0.layer.0.SelfAttention.q.weight"])


def test_legacy_pth_format_loads(tiny, tmp_path):
    sd = _wan_sd(tiny)
    (tmp_path / TOKENIZER_DIR).mkdir(parents=True)
    for f in (tiny / TOKENIZER_DIR).iterdir():
        (tmp_path / TOKENIZER_DIR / f.name).write_bytes(f.read_bytes())
    torch.save(sd, tmp_path / T5_FILE, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    enc = load_text_encoder(tmp_path, dtype=torch.float32)
    assert torch.equal(enc.model.encoder.final_layer_norm.weight, sd["norm.weight"].float())


def test_tiny_writer_is_reproducible_with_t5_special_ids(tiny, enc32, tmp_path):
    write_tiny_t5(tmp_path, seed=3)
    for f in (T5_FILE, f"{TOKENIZER_DIR}/tokenizer.json", f"{TOKENIZER_DIR}/tokenizer_config.json",
              f"{TOKENIZER_DIR}/special_tokens_map.json"):
        assert (tmp_path / f).read_bytes() == (tiny / f).read_bytes(), f
    tok = enc32.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert 200 <= len(tok) == enc32.model.config.vocab_size <= 5000
    write_tiny_t5(tmp_path, seed=4)
    assert (tmp_path / T5_FILE).read_bytes() != (tiny / T5_FILE).read_bytes()
