"""Hardware profiles: small TOML files (`profiles/*.toml`) loaded into a typed, frozen `Profile`.

`Profile.from_name("4090", kv_dtype="bf16")` reads `profiles/4090.toml` and applies overrides;
`Profile.from_name("auto")` reads the GPU's name, memory and compute capability and the host RAM
and picks a profile. Unknown keys (in a file or in overrides) and bad values raise `LowvramError`
with a one-line message that says how to fix them. `parse_set(["key=value", ...])` turns the
CLI's `--set` strings into typed overrides.

`auto` on a machine without a CUDA GPU is an error: the 14B model needs a GPU (the tiny demo
checkpoint runs on the CPU without a profile), and `lowvram plan --profile NAME` plans for a
named card from any machine.

`Profile.resident(quant, vram_budget_gib)` is the preset of a run without `--profile`: every block
and the four step caches on the device in the checkpoint's precision. Its fields take overrides like
any profile's, so `--set`, `--attention` and `--t5` mean the same with or without a profile.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from importlib import resources

from lowvram.constants import GIB
from lowvram.errors import LowvramError
from lowvram.model.attention import CHOICES as ATTENTION_CHOICES
from lowvram.model.attention import Attention

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 ships no TOML reader; tomli is the same parser under its PyPI name
    import tomli as tomllib


CHOICES: dict[str, tuple[str, ...]] = {
    "quant": ("int8", "fp8", "bf16"),
    "attention": ATTENTION_CHOICES,
    "kv_placement": ("gpu", "host"),
    "kv_dtype": ("bf16", "int8"),
    "t5": ("bf16", "int8", "nf4", "cpu"),
    "vae_decode": ("frame", "fast", "lean", "tiny"),
    "gemm": ("auto", "int_mm", "scaled_mm", "triton", "reference"),
    "schedule": ("sequential", "batched"),
    "vae_overlap": ("auto", "on", "off"),
    "cuda_graphs": ("auto", "on", "off"),
}
# Fields a file or `--set` may not change: the name is the file's stem.
FIXED = ("name",)
RESIDENT = "resident"  # the name of the preset a run without --profile uses


@dataclass(frozen=True)
class Profile:
    """One hardware preset; every run-time memory decision starts from it."""

    name: str
    description: str  # one line, shown by `lowvram profiles`
    vram_budget_gib: float  # the planner keeps the expected peak (NVML) under this
    quant: str  # DiT Linear weights: int8 | fp8 (W8A8) | bf16
    attention: Attention  # sdpa (torch) | triton (bf16 kernel) | triton8 (8-bit QK/PV kernel) | sage / fa4 (SageAttention 2 /
    #                       FlashAttention 4, where installed) | auto (by the GPU: lowvram.runtime.planner.resolve_attention)
    kv_placement: str  # the four step KV caches: gpu | host (pinned RAM, streamed per layer)
    kv_dtype: str  # bf16 | int8 (per-token-per-head absmax; host placement only; the sink K/V follow it); with
    #                 attention triton8 the step caches hold the 8-bit kernel's format (kv8) and this sets the sink
    t5: str  # umT5 while encoding the prompt: bf16 | int8 | nf4 on the GPU, or cpu
    vae_decode: str  # frame: the Wan VAE, one latent at a time, the reference's bits | fast: the same with
    #                   channels-last convs, the fused norm, sub-pixel up-sampling, 128-wide conv outputs and CUDA
    #                   graphs (bf16-close; the planner takes lean where fast's memory would cost a resident block,
    #                   the batch or the fit) | lean: fast's arithmetic without the graphs and the wide outputs
    #                   (less memory, a little slower) | tiny: TAEHV (drafts)
    blocks_resident: str | int  # "auto" (as many as the budget allows), "all", or a count
    pinned_budget_gib: float  # most page-locked host memory to take; the rest is pageable
    prefetch_blocks: int  # streamed blocks copied ahead of use (GPU buffers = this + 1)
    kv_layers_ahead: int  # host KV caches: layers of windows in flight (the device ring holds the call's windows of
    #                       one layer and of this many - 1 more; each window of the batch ~0.31 GB at 704x384)
    gemm: str  # QuantLinear's W8A8 matmul: auto (CUDA: triton, else int_mm / scaled_mm by scheme) | int_mm | scaled_mm | triton | reference
    schedule: str  # sequential: one forward per DiT call | batched: a tick's (block, step) pairs in one call
    vae_overlap: str  # on: a finished block decodes on a CUDA stream of its own while the DiT works on the next
    #                    (the plan holds both activations at once) | off: decode between DiT calls | auto: on
    #                    where a plan fits with it (even one with more blocks streamed), else off
    compute_capability: str  # "8.9": the card this profile is for ("" none); attention "auto" goes by it where no
    #                          GPU is measured (`lowvram plan` on another machine); a measured GPU's own wins
    cuda_graphs: str  # auto: the steady DiT calls replayed as CUDA graphs where every block and step cache is on the
    #                   GPU (bf16), each call runs all the held steps, and the graph's memory costs no resident block
    #                   or batch | on: the same, an error where it cannot | off (runtime/graphs.py)

    def __post_init__(self) -> None:
        where = f"profile {self.name}"
        if self.attention in CHOICES["attention"]:
            object.__setattr__(self, "attention", Attention(self.attention))
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise LowvramError(f"{where}: {key}={value!r} is not one of {', '.join(allowed)}; "
                                   f"use --set {key}={allowed[0]}")
        if not isinstance(self.description, str) or "\n" in self.description or not self.description:
            raise LowvramError(f"{where}: description must be one non-empty line")
        if not 0 < self.vram_budget_gib <= 1024:
            raise LowvramError(f"{where}: vram_budget_gib={self.vram_budget_gib} must be in (0, 1024] GiB; "
                               "use --set vram_budget_gib=22")
        if not 0 <= self.pinned_budget_gib <= 16384:
            raise LowvramError(f"{where}: pinned_budget_gib={self.pinned_budget_gib} must be >= 0; "
                               "use --set pinned_budget_gib=32")
        if isinstance(self.blocks_resident, bool) or not (self.blocks_resident in ("auto", "all") or (
                isinstance(self.blocks_resident, int) and self.blocks_resident >= 0)):
            raise LowvramError(f"{where}: blocks_resident={self.blocks_resident!r} must be 'auto', 'all' or a count "
                               ">= 0; use --set blocks_resident=auto")
        if isinstance(self.prefetch_blocks, bool) or not (isinstance(self.prefetch_blocks, int)
                                                          and 0 <= self.prefetch_blocks <= 8):
            raise LowvramError(f"{where}: prefetch_blocks={self.prefetch_blocks!r} must be an integer in 0..8; "
                               "use --set prefetch_blocks=1")
        if isinstance(self.kv_layers_ahead, bool) or not (isinstance(self.kv_layers_ahead, int)
                                                          and 1 <= self.kv_layers_ahead <= 8):
            raise LowvramError(f"{where}: kv_layers_ahead={self.kv_layers_ahead!r} must be an integer in 1..8; "
                               "use --set kv_layers_ahead=2")
        if not isinstance(self.compute_capability, str) or (self.compute_capability and self.card_capability() is None):
            raise LowvramError(f"{where}: compute_capability={self.compute_capability!r} must be a string MAJOR.MINOR, "
                               'e.g. "8.9", or ""; use --set compute_capability=8.9')
        if self.kv_dtype == "int8" and self.kv_placement == "gpu":
            raise LowvramError(f"{where}: kv_dtype=int8 exists to halve PCIe traffic and needs kv_placement=host; "
                               "use --set kv_dtype=bf16 or --set kv_placement=host")

    def card_capability(self) -> tuple[int, int] | None:
        """compute_capability as (major, minor); None when empty (or malformed, which __post_init__ refuses)."""
        major, dot, minor = self.compute_capability.partition(".")
        return (int(major), int(minor)) if dot and major.isdigit() and minor.isdigit() else None

    # ------------------------------------------------------------------ loading
    @staticmethod
    def names() -> list[str]:
        """Names of the shipped profiles (file stems), sorted, without `auto`."""
        root = resources.files("lowvram.profiles")
        return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))

    @classmethod
    def from_name(cls, name: str, scheme: str | None = None, device=None, **overrides) -> "Profile":
        """Load `profiles/<name>.toml` (or detect with `auto`, for the checkpoint's `scheme` on `device`), then
        apply typed overrides."""
        if name == "auto":
            return cls.from_name(detect_profile_name(scheme, device), **overrides)
        names = cls.names()
        if name not in names:
            raise LowvramError(f"unknown profile {name!r}; choose one of {', '.join(names)}, auto "
                               "(`lowvram profiles` lists them)")
        path = resources.files("lowvram.profiles") / f"{name}.toml"
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise LowvramError(f"profiles/{name}.toml is not valid TOML ({e}); fix or reinstall it") from None
        _check_keys(raw, f"profiles/{name}.toml")
        _check_keys(overrides, "overrides")
        missing = [f.name for f in fields(cls) if f.name not in FIXED and f.name not in raw]
        if missing:
            raise LowvramError(f"profiles/{name}.toml lacks {', '.join(missing)}; add them or reinstall lowvram")
        return cls(name=name, **{**raw, **overrides})

    @classmethod
    def resident(cls, quant: str, vram_budget_gib: float, **overrides) -> "Profile":
        """Everything on the device in the checkpoint's precision (`quant`): the run without --profile.

        vram_budget_gib: what the device has (the planner refuses a run whose expected peak is larger)."""
        base = dict(description="everything resident on the device, in the checkpoint's precision",
                    vram_budget_gib=float(vram_budget_gib), quant=quant, attention=Attention.SDPA, kv_placement="gpu",
                    kv_dtype="bf16", t5="bf16", vae_decode="frame", blocks_resident="all", pinned_budget_gib=0.0,
                    prefetch_blocks=1, kv_layers_ahead=2, gemm="auto", schedule="sequential", vae_overlap="off",
                    compute_capability="", cuda_graphs="off")
        _check_keys(overrides, "overrides")
        return cls(name=RESIDENT, **{**base, **overrides})

    def with_overrides(self, **overrides) -> "Profile":
        """A copy with some fields replaced (validated like a file)."""
        _check_keys(overrides, "overrides")
        return replace(self, **overrides)

    def summary(self, attention: str | None = None, kv_format: str | None = None) -> str:
        """One line for `lowvram profiles`: attention and KV format as resolved for the profile's own card when
        given (planner.resolve_attention), else as the profile sets them."""
        return (f"{self.name:<8} {self.vram_budget_gib:5.1f} GiB  {self.quant:<4} KV {self.kv_placement}/"
                f"{kv_format or self.kv_dtype:<4}  attention {attention or self.attention:<7}  {self.schedule:<10}  "
                f"{self.description}")


def _check_keys(raw: dict, where: str) -> None:
    known = [f.name for f in fields(Profile) if f.name not in FIXED]
    bad = [k for k in raw if k not in known]
    if bad:
        raise LowvramError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; known keys: {', '.join(known)}")


def _field_type(key: str) -> str:
    return {f.name: f.type for f in fields(Profile)}[key]


def parse_set(items: list[str] | tuple[str, ...]) -> dict:
    """`["vram_budget_gib=20", "kv_dtype=bf16"]` -> typed overrides; one-line LowvramError on bad input."""
    known = [f.name for f in fields(Profile) if f.name not in FIXED]
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise LowvramError(f"--set {item!r}: expected key=value, e.g. --set vram_budget_gib=20")
        if key not in known:
            raise LowvramError(f"--set {key}: unknown key; known keys: {', '.join(known)}")
        kind = _field_type(key).replace("Attention", "str")
        try:
            if kind == "float":
                out[key] = float(value)
            elif kind == "int":
                out[key] = int(value)
            elif kind == "str | int":
                out[key] = value if value in ("auto", "all") else int(value)
            else:
                out[key] = value
        except ValueError:
            want = {"float": "a number", "int": "an integer", "str | int": "'auto' or an integer, or 'all'"}[kind]
            raise LowvramError(f"--set {key}={value!r}: expected {want}") from None
        if key in CHOICES and value not in CHOICES[key]:
            raise LowvramError(f"--set {key}={value!r}: expected one of {', '.join(CHOICES[key])}")
    return out


# ---------------------------------------------------------------------- auto-detection
def pick_profile_name(gpu_name: str, total_gib: float, capability: tuple[int, int], host_ram_gib: float,
                      scheme: str | None = None) -> str:
    """The shipped profile for a GPU (pure function of what `detect_profile_name` measures); with `scheme`
    (the checkpoint's weights), an 80 GB card picks the profile of that scheme."""
    fp8 = capability >= (8, 9)
    if total_gib >= 70:
        return "h100-80" if fp8 and scheme != "int8" else "a100-80"
    if total_gib >= 22:
        return "4090" if fp8 else "3090"
    if total_gib >= 15:
        return "16gb"
    if total_gib >= 11:
        return "12gb"
    raise LowvramError(f"{gpu_name} has {total_gib:.1f} GiB; lowvram needs a GPU with at least 12 GB "
                       f"(host RAM {host_ram_gib:.0f} GiB)")


def detect_profile_name(scheme: str | None = None, device=None) -> str:
    """Read the GPU (torch.cuda; GPU 0 by default) and the host RAM (psutil) and pick a profile."""
    import psutil
    import torch

    if not torch.cuda.is_available():
        raise LowvramError("--profile auto found no CUDA GPU; pass a named profile "
                           "(lowvram profiles lists them) or run `lowvram demo` on the CPU")
    props = torch.cuda.get_device_properties(device if device is not None else 0)
    return pick_profile_name(props.name, props.total_memory / GIB, (props.major, props.minor),
                             psutil.virtual_memory().total / GIB, scheme)
