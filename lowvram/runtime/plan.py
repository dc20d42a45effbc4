"""The resolved plan of a run, and `plan_run`: the one function that makes it.

A `Plan` carries everything a run decides: precision, attention backend, GEMM backend, T5 mode,
residency and buffers, where and in which format the step KV caches live, how the sink is kept, the
bytes over PCIe and the expected peaks. `lowvram plan` prints the plan that `lowvram run` executes:
both call `plan_run` with the same profile, overrides, checkpoint, size and machine.

Policies (one each):
- precision: the checkpoint's weights decide. A profile whose `quant` is not the checkpoint's scheme is a
  one-line error that says how to fix it (`--set quant=...`, or `lowvram quantize`); `--profile auto` picks
  a profile of the checkpoint's scheme where one fits the card. A directory holding only config.json
  (planning before the download) is planned for the profile's scheme, with estimated sizes.
- size: `--size W*H` is a pixel-area budget; the output keeps the portrait's aspect ratio, padded to
  multiples of 64 (the reference's rule). Without a portrait, the aspect of W:H is assumed.
- machine: `Machine.detect` (free VRAM under the allocator cap, host RAM available now), or the sizes given.
- no profile: the resident preset (`Profile.resident`), which takes the same overrides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lowvram.constants import GIB, NUM_STEPS, T5_FILE, VAE_FILE, WAV2VEC_DIR
from lowvram.errors import LowvramError
from lowvram.model.attention import LIBRARIES, Attention, library_module
from lowvram.runtime.profile import Profile


@dataclass(frozen=True)
class PlanItem:
    what: str
    where: str  # "gpu" | "host" | "gpu (encode phase)"
    nbytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """What lives where for one profile, model and resolution (lowvram.cli.plan renders it)."""

    profile: Profile
    width: int
    height: int
    tokens: dict
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    n_buffers: int
    kv_caches: tuple[str, ...]  # placement of each held step's cache (aligned with `steps`): "gpu" | "host"
    kv_dtype: str  # the profile's kv_dtype
    kv_format: str  # how the step caches are stored: KVFormat value ("bf16" | "int8" | "kv8")
    kv_slots: int
    block_bytes: tuple[int, ...]  # slab bytes of each block (with its attached injector)
    demote_order: tuple[int, ...]  # order in which blocks leave the GPU (planner and OOM fallback agree)
    items: tuple[PlanItem, ...]
    encode_peak_bytes: int
    generate_peak_bytes: int
    pcie_h2d_bytes: int  # host->GPU bytes per full-window forward (streamed blocks shared by a batched call)
    pcie_d2h_bytes: int  # GPU->host bytes (write-back of the new K/V chunk)
    host_pinned_bytes: int
    host_pageable_bytes: int
    pinned_kv_caches: int  # how many of the host step caches get page-locked memory
    pinned_blocks: tuple[int, ...]  # streamed blocks whose slabs are page-locked
    exact_bytes: bool  # True when tensor sizes came from the checkpoint's files
    sink_dtype: str  # how the sink K/V are kept on the GPU ("bf16" | "int8")
    quant: str  # the DiT's Linear weights: int8 | fp8 | bf16
    attention: Attention
    gemm: str  # QuantLinear's matmul backend
    t5: str  # umT5 while encoding the prompt: bf16 | int8 | nf4 | cpu
    host_reserve_bytes: int  # host RAM the plan keeps for the process besides its buffers
    steps: tuple[int, ...] = (0, 1, 2, 3)  # the denoising steps whose caches this plan holds
    batch: int = 1  # forwards per DiT call (the profile's schedule: 1 sequential, len(steps) batched)
    streamed_bytes_per_call: int = 0  # host->GPU bytes of the streamed blocks, once per DiT call
    attention_why: str = ""  # how `attention` was chosen (the profile's "auto" resolved by the GPU, or set)
    vae_overlap: bool = False  # a finished block decodes on its own stream beside the next DiT call (the
    #                            profile's vae_overlap resolved: its activations are planned beside the DiT's)
    gpu_kv_sink: int = 0  # sink tokens of room behind every layer's window of each GPU step cache (GpuKVCache.
    #                       joined; the planner gives it where it costs no resident block, else 0: torch.cat)
    cuda_graphs: bool = False  # the steady DiT calls replay a CUDA graph (the profile's cuda_graphs resolved; the
    #                            graph's pool keeps the DiT's activations beside the decoder's)
    graphs_why: str = ""  # why cuda_graphs is on or off

    @property
    def schedule(self) -> str:
        return self.profile.schedule

    def pcie_h2d_bytes_at(self, batch: int) -> int:
        """Host->GPU bytes per forward if a DiT call ran `batch` forwards (the plan's own: `pcie_h2d_bytes`)."""
        return self.pcie_h2d_bytes - self.streamed_bytes_per_call // self.batch + self.streamed_bytes_per_call // batch

    @property
    def peak_bytes(self) -> int:
        return max(self.encode_peak_bytes, self.generate_peak_bytes)

    @property
    def host_bytes(self) -> int:
        """Host RAM the run needs: its pinned and pageable buffers plus the process's reserve."""
        return self.host_pinned_bytes + self.host_pageable_bytes + self.host_reserve_bytes

    def headline(self) -> str:
        """One line for the progress display and the web page."""
        scheme = "bf16" if self.quant == "bf16" else f"{self.quant} W8A8"
        return (f"{len(self.resident)}/{len(self.block_bytes)} blocks resident, KV {self.kv_caches[0]} "
                f"{self.kv_format}, {scheme}, expected peak {self.peak_bytes / GIB:.1f} GiB")

    def to_dict(self) -> dict:
        """JSON-ready (the run's --report, `lowvram plan --json`)."""
        out = asdict(self)
        out["attention"] = self.attention.value
        out["profile"]["attention"] = self.profile.attention.value
        return out


def resolve_size(size: str, image: Path | None = None) -> tuple[int, int]:
    """Output (W, H) for `--size` (a pixel-area budget) and the portrait's aspect ratio (docs/model.md §8.1)."""
    from lowvram.io.media import gen_size, parse_dims

    w, h = parse_dims(size)
    if image is not None:
        from PIL import Image

        try:
            with Image.open(image) as im:  # reads the header only
                w_img, h_img = im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            raise LowvramError(f"cannot read image {image}: Pillow cannot open it as an image; "
                               "give a png, jpg or webp file") from None
        return gen_size(w_img, h_img, w * h)
    return gen_size(w, h, w * h)


def float_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class PlanSource:
    """What the planner reads of a checkpoint directory: config.json and whichever files are there (a full
    checkpoint, a quantized directory, or config.json alone before the download: then sizes are estimated)."""

    root: Path
    shards: tuple[Path, ...]
    t5: Path | None
    vae: Path | None
    wav2vec: Path | None

    @classmethod
    def of(cls, ckpt) -> "PlanSource":
        from lowvram.io.weights import Checkpoint
        from lowvram.quantize.format import read_index

        if isinstance(ckpt, Checkpoint):
            return cls(ckpt.root, ckpt.shards, ckpt.t5, ckpt.vae, ckpt.wav2vec)
        root = Path(ckpt)
        if not (root / "config.json").is_file():
            from lowvram.io.weights import discover

            discover(root)  # raises the one-line error that lists what is missing
        weight_map = read_index(root) or {}
        shards = tuple(root / s for s in sorted(set(weight_map.values())) if (root / s).is_file())
        files = {name: root / name for name in (T5_FILE, VAE_FILE) if (root / name).is_file()}
        return cls(root, shards, files.get(T5_FILE), files.get(VAE_FILE),
                   root / WAV2VEC_DIR if (root / WAV2VEC_DIR).is_dir() else None)

    def dit_config(self):
        from lowvram.io.weights import dit_config_of

        return dit_config_of(self.root / "config.json", self.shards)


def device_tensor_bytes(shards, compute_dtype: torch.dtype) -> dict[str, int]:
    """DiT tensor name -> bytes once loaded: from the shard headers, floats at the compute dtype, the 8-bit
    weights and their fp32 scales as stored."""
    import math

    from lowvram.quantize.shards import read_header

    fb = float_bytes(compute_dtype)
    out = {}
    for shard in shards:
        for name, e in read_header(shard).items():
            if name == "__metadata__":
                continue
            keeps = name.rpartition(".")[2] in ("qweight", "scale") or e["dtype"] not in ("BF16", "F16", "F32", "F64")
            n = math.prod(e["shape"])
            out[name] = (e["data_offsets"][1] - e["data_offsets"][0]) if keeps else n * fb
    return out


def component_sizes(src: PlanSource, compute_dtype: torch.dtype):
    """The planner's `Sizes` read off the files that are there: DiT tensors from the shard headers, umT5's
    embedding and other parameters, wav2vec2's and the VAE decoder's parameter counts (shapes only); the
    released model's counts for the files that are not."""
    from lowvram.model.vae import config_from_state_dict
    from lowvram.runtime.planner import Sizes

    kw = {}
    if src.shards:
        kw = {"dit": device_tensor_bytes(src.shards, compute_dtype), "exact": True}
    t5 = _mapped_state_dict(src.t5) if src.t5 else {}
    if t5:
        embed = t5["token_embedding.weight"].numel() if "token_embedding.weight" in t5 else 0
        kw.update(t5_embed_params=embed, t5_other_params=sum(v.numel() for v in t5.values()) - embed)
    w2v = _safetensors_params(src.wav2vec) if src.wav2vec else 0
    if w2v:
        kw["wav2vec2_params"] = w2v
    vae = _mapped_state_dict(src.vae) if src.vae else {}
    if vae:
        kw["vae_decoder_params"] = sum(v.numel() for k, v in vae.items() if k.startswith(("decoder.", "conv2.")))
        kw["vae_dim"] = config_from_state_dict(vae, str(src.vae)).dim
    return replace(Sizes(), **kw)


def _mapped_state_dict(path) -> dict:
    """A torch .pth state dict memory-mapped (shapes without reading tensor data); {} when it cannot be mapped
    (a legacy non-zip file: the released model's counts serve instead, and loading it reports any damage)."""
    try:
        sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return {}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}


def _safetensors_params(folder: Path) -> int:
    import math

    from lowvram.quantize.shards import read_header

    files = sorted(Path(folder).glob("*.safetensors"))
    return sum(math.prod(e["shape"]) for f in files for k, e in read_header(f).items() if k != "__metadata__")


def parse_overrides(overrides) -> dict:
    """`--set` strings or an already typed mapping -> typed overrides."""
    from lowvram.runtime.profile import parse_set

    if isinstance(overrides, Mapping):
        return dict(overrides)
    return parse_set(list(overrides))


def plan_run(ckpt, profile: str | None = None, overrides: Mapping | Sequence[str] = (), size: str = "704*384",
             image: Path | None = None, machine=None, device: torch.device | None = None,
             dtype: torch.dtype | None = None, steps: int = NUM_STEPS, held: Sequence[int] | None = None,
             decode: bool = True, encode: bool = True) -> Plan:
    """The plan of a run: profile (or the resident preset) + overrides + checkpoint + size/portrait + machine.
    steps: the Euler steps per block (one KV ring cache each).

    ckpt: a Checkpoint or a directory (config.json alone is enough: sizes are then estimated); device/dtype:
    where and in which precision the run computes (default: CUDA if visible, bf16 there and fp32 on the
    CPU); machine: `Machine.detect(device)` unless given; steps, decode, encode: what one rank of the
    timestep-forcing pipeline holds and runs (lowvram.runtime.planner.make_plan; default: everything)."""
    from lowvram.quantize.format import detect_format
    from lowvram.runtime.machine import Machine
    from lowvram.runtime.planner import make_plan

    src = PlanSource.of(ckpt)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    machine = machine or Machine.detect(device)
    info = detect_format(src.root)
    scheme = info.scheme if info is not None else "bf16"
    ov = parse_overrides(overrides)
    if profile is None:  # on a GPU the resident preset decodes with the fast VAE path (on the CPU the exact one)
        ov = {"vae_decode": "fast", **ov} if device.type == "cuda" else ov
        prof = Profile.resident(ov.pop("quant", scheme), ov.pop("vram_budget_gib", machine.resident_budget_gib()), **ov)
    else:
        prof = Profile.from_name(profile, scheme=scheme, device=device if device.type == "cuda" else None, **ov)
    if prof.quant != scheme and src.shards:  # config.json alone: planned for the profile's scheme, estimated
        if scheme == "bf16":
            raise LowvramError(f"profile {prof.name} runs {prof.quant} weights but {src.root} is the bf16 checkpoint; "
                               f"convert it once with `lowvram quantize --ckpt-dir {src.root} --scheme {prof.quant} "
                               f"--out <dir>` and pass --ckpt-dir <dir>, or add --set quant=bf16")
        raise LowvramError(f"{src.root} is quantized as {scheme} but profile {prof.name} uses {prof.quant}; "
                           f"use --set quant={scheme} or re-run `lowvram quantize --scheme {prof.quant}`")
    width, height = resolve_size(size, image)
    plan = make_plan(prof, src.dit_config(), width, height, free_vram_bytes=machine.free_vram_bytes,
                     host_ram_bytes=machine.host_ram_bytes, sizes=component_sizes(src, dtype),
                     steps=range(steps) if held is None else held, decode=decode, encode=encode,
                     capability=machine.capability, device_type=device.type)
    if plan.attention in LIBRARIES:  # an optional library: refused here, before any weight is read
        why = library_module(plan.attention).unavailable(device)
        if why is not None:
            raise LowvramError(f"--attention {plan.attention} cannot run on {device}: {why}; or use --attention sdpa")
    return plan
