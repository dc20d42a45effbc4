"""Compare lowvram's DiT with LiveAvatar's own `CausalWanModel_S2V` (fp32, CPU, the tiny configuration).

    pip install diffusers einops easydict
    python tools/compare_reference.py --liveavatar PATH_TO_A_LIVEAVATAR_CHECKOUT

Runs the reference's sink prefill and 5 streaming forwards (ring wrap at block 4, a different rolling-sink
shift d each call, fixed in the reference by replacing its `random.randint`) and lowvram's on the same
weights and inputs, and prints the relative error of every sink K/V layer and every velocity. The reference
is imported at run time from the checkout (nothing of it is copied here); its package __init__ files are
skipped, CUDA-only pieces are redirected to the CPU (its attention to torch SDPA, `.to("cuda")` to the
CPU), and its sink pass's hard-coded width 5120 must be patched to `self.dim` in the checkout
(`torch.zeros([1,5120,nf,` -> `torch.zeros([1,self.dim,nf,` in causal_model_s2v.py) for a tiny model.
"""

import argparse
import os
import random
import sys
import types

import torch
import torch.nn.functional as F


def import_reference(root: str):
    for path, _, files in os.walk(os.path.join(root, "liveavatar")):
        if "__init__.py" in files:  # register packages without running their heavy __init__ files
            name = os.path.relpath(path, root).replace(os.sep, ".")
            m = types.ModuleType(name)
            m.__path__ = [path]
            sys.modules[name] = m
    sys.path.insert(0, root)
    torch.cuda.current_device = lambda: 0
    to = torch.Tensor.to

    def cpu_to(self, *a, **k):
        a = tuple("cpu" if isinstance(x, str) and x.startswith("cuda") else x for x in a)
        if isinstance(k.get("device"), str) and k["device"].startswith("cuda"):
            k["device"] = "cpu"
        return to(self, *a, **k)

    torch.Tensor.to = cpu_to
    import liveavatar.models.wan.causal_model_s2v as R
    import liveavatar.models.wan.wan_2_2.modules.model as RM

    def sdpa(q, k, v, k_lens=None, window_size=None, **kw):
        return F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                              v.transpose(1, 2).float()).transpose(1, 2).type_as(q)

    R.attention = sdpa
    RM.flash_attention = sdpa
    return R


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--liveavatar", required=True, help="a checkout of Alibaba-Quark/LiveAvatar")
    args = ap.parse_args(argv)
    R = import_reference(args.liveavatar)
    from lowvram.demo.tiny import TINY_CONFIG, tiny_dit_state_dict
    from lowvram.model.config import DiTConfig
    from lowvram.model.dit import build_model
    from lowvram.runtime.kv_cache import GpuKVCache

    cfg = DiTConfig.from_dict(dict(TINY_CONFIG, num_audio_layers=25))  # the reference hard-codes 25 states
    sd = {k: v.float() for k, v in tiny_dit_state_dict(cfg, seed=5).items()}
    ref = R.CausalWanModel_S2V(cond_dim=16, audio_dim=cfg.audio_dim, num_audio_token=4, enable_adain=True,
                               adain_mode="attn_norm", audio_inject_layers=list(cfg.audio_inject_layers),
                               zero_init=True, zero_timestep=True, enable_motioner=False, add_last_motion=True,
                               enable_framepack=True, framepack_drop_mode="padd", dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                               freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, num_heads=cfg.num_heads,
                               num_layers=cfg.num_layers, in_dim=16, out_dim=16)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    ref.eval()
    mine = build_model(cfg, "meta")
    mine.load_state_dict(sd, assign=True)
    mine.eval()

    g = torch.Generator().manual_seed(0)
    h, w = 32, 48
    tok = (h // 2) * (w // 2)
    L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
    ctx = torch.randn(9, cfg.text_dim, generator=g)
    ref_lat, mot = torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 16, 19, h, w, generator=g)
    audio = torch.randn(1, 25, cfg.audio_dim, 48, generator=g)
    cap = 12 * tok
    caches = [{"k": torch.zeros(1, cap, H, D), "v": torch.zeros(1, cap, H, D), "cond_k": torch.zeros(1, 3000, H, D),
               "cond_v": torch.zeros(1, 3000, H, D), "cond_end": torch.tensor([0])} for _ in range(L)]
    common = dict(context=[ctx], seq_len=None, cond_states=torch.zeros(1, 16, 3, h, w), motion_latents=mot,
                  ref_latents=ref_lat, motion_frames=[73, 19], drop_motion_frames=False, kv_cache=caches,
                  crossattn_cache=[None] * L)
    worst = 0.0
    with torch.no_grad():
        ref(x=[torch.zeros(16, 3, h, w)], t=torch.zeros(1, 3), audio_input=audio[..., :12], sink_flag=True,
            current_start=0, current_end=3 * tok, **common)
        c = mine.embed_text([ctx])
        sink = mine.prefill_sink(ref_lat, mot, c)
        n = int(caches[0]["cond_end"])
        for i in range(L):
            ek = ((caches[i]["cond_k"][:, :n] - sink.k[i]).norm() / sink.k[i].norm()).item()
            ev = ((caches[i]["cond_v"][:, :n] - sink.v[i]).norm() / sink.v[i].norm()).item()
            worst = max(worst, ek, ev)
            print(f"sink layer {i}: K rel err {ek:.2e}, V rel err {ev:.2e}")
        kv = GpuKVCache(L, cap, 1, H, D, torch.float32, "cpu")
        randint = random.randint
        for b, d in zip(range(5), (7, 12, 20, 4, 30)):
            x = torch.randn(16, 3, h, w, generator=g)
            t = torch.full((1, 3), 857.6923)
            a = audio[..., (b % 4) * 12:(b % 4) * 12 + 12]
            random.randint = lambda lo, hi, d=d: d  # the reference's unseeded rolling-sink shift
            try:
                vr = ref(x=[x], t=t, audio_input=a, current_start=b * 3 * tok, current_end=(b + 1) * 3 * tok,
                         **common)[0]
            finally:
                random.randint = randint
            vm = mine(x[None], t, c, a, kv, sink, start_frame=3 * b, ref_shift=d)[0]
            e = ((vr - vm).norm() / vr.norm()).item()
            worst = max(worst, e)
            print(f"block {b} (d={d}): velocity rel err {e:.2e}")
    print(f"worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()
