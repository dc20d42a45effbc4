"""LoRA adapters in PEFT's safetensors layout: read memory-mapped, check against the base, merge per layer.

LiveAvatar merges its DMD LoRA with PEFT (`W += (alpha / r) * B @ A`, adapters upcast to fp32) before any
quantization (docs/model.md §2.3). `LoraSet` does the same one weight at a time, so the merge never holds more
than one layer beyond what the caller already has.

Accepted key spellings (`<module>` is the base model's module name, e.g. `blocks.0.self_attn.q`):
    [base_model.model.][diffusion_model.]<module>.lora_A[.<adapter>].weight   (and lora_B)
    [base_model.model.][diffusion_model.]<module>.lora_down.weight / .lora_up.weight   (A / B)
    [...]<module>.alpha                                                          (per-module alpha, optional)
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lowvram.errors import CheckpointError, LowvramError

# PEFT's `target_modules` of the LiveAvatar training yaml (s2v_causal_sft.yaml).
LIVEAVATAR_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
DEFAULT_ALPHA = 64.0
MERGE_CHUNK = 1 << 22  # elements of fp32 scratch per row block
METADATA_ALPHA_KEYS = ("lora_alpha", "alpha", "ss_network_alpha")

_PREFIX = r"^(?:base_model\.model\.)?(?:diffusion_model\.)?"
_PAIR_RE = re.compile(_PREFIX + r"(?P<mod>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_RE = re.compile(_PREFIX + r"(?P<mod>.+)\.alpha$")
_KIND = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}


def lora_target_keys(base_keys, targets=LIVEAVATAR_TARGETS) -> list[str]:
    """The `.weight` keys PEFT would wrap for `target_modules=targets`.

    PEFT matches a module whose name equals a target or ends with `.<target>`.
    """
    out = []
    for key in base_keys:
        if not key.endswith(".weight"):
            continue
        mod = key[: -len(".weight")]
        if any(mod == t or mod.endswith("." + t) for t in targets):
            out.append(key)
    return out


def check_alpha(alpha, flag: str = "--lora-alpha") -> float | None:
    """A LoRA alpha given by the user: None (use the file's), or a positive finite number.

    A zero, negative or NaN alpha would scale the LoRA's delta to nothing, flip it or poison every weight
    with NaN, and the run would still "succeed"; callers check it before any work (LoraSet.load does too).
    """
    if alpha is None:
        return None
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise LowvramError(f"{flag} must be a positive number (got {alpha!r}); LiveAvatar's LoRA uses "
                           f"{DEFAULT_ALPHA:g}, or leave it out to use the file's own")
    return value


def _parse_alpha(raw: str, path: Path, name: str) -> float:
    try:
        alpha = float(raw)
    except ValueError:
        raise CheckpointError(f"LoRA {path}: metadata {name}={raw!r} is not a number; "
                              "fix the file or pass --lora-alpha") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise CheckpointError(f"LoRA {path}: metadata {name}={raw!r} must be a positive number; "
                              "fix the file or pass --lora-alpha")
    return alpha


class LoraSet:
    """The adapters of one LoRA file, keyed by the base weight they modify.

    Use `LoraSet.load(path)`, then `check(base_shapes)` once, then `merge(key, weight)` per layer.
    """

    def __init__(self, path: Path, pairs: dict[str, tuple[str, str]], ranks: dict[str, int],
                 alphas: dict[str, float], alpha_source: str):
        self.path = path
        self._pairs = pairs  # module -> (key of A [r, in], key of B [out, r])
        self.ranks = ranks  # module -> r
        self.alphas = alphas  # module -> alpha
        self.alpha_source = alpha_source  # "tensor", "metadata", "argument" or "default"

    @classmethod
    def load(cls, path, alpha: float | None = None, default_alpha: float = DEFAULT_ALPHA) -> "LoraSet":
        """Index the adapter pairs of a LoRA .safetensors (memory-mapped; reopened per merge, so a mapping
        and the resident pages it brings never outlive one layer).

        alpha comes from per-module `.alpha` tensors, else the header metadata (`lora_alpha`/`alpha`),
        else `alpha`, else `default_alpha`; the scale of a module is alpha / rank.
        """
        alpha = check_alpha(alpha)
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"LoRA file {path} does not exist; pass the path of liveavatar.safetensors")
        with cls._open(path) as f:
            return cls._index(path, f, alpha, default_alpha)

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"LoRA {path} is not a readable safetensors file ({e}); re-download it") from None

    @classmethod
    def _index(cls, path: Path, f, alpha, default_alpha) -> "LoraSet":
        halves: dict[str, dict[str, str]] = {}
        alpha_keys: dict[str, str] = {}
        adapters = set()
        for key in sorted(f.keys()):
            m = _PAIR_RE.match(key)
            if m:
                adapters.add(m["adapter"])
                slot = halves.setdefault(m["mod"], {})
                kind = _KIND[m["kind"]]
                if kind in slot:
                    raise CheckpointError(f"LoRA {path}: module {m['mod']} has two {m['kind']} tensors "
                                          f"({slot[kind]}, {key}); keep one adapter per file")
                slot[kind] = key
                continue
            m = _ALPHA_RE.match(key)
            if m:
                alpha_keys[m["mod"]] = key
                continue
            raise CheckpointError(f"LoRA {path}: tensor {key!r} is not a LoRA weight (expected "
                                  "<module>.lora_A/lora_B[.default].weight); remove non-LoRA tensors from the file")
        if len(adapters) > 1:
            raise CheckpointError(f"LoRA {path} holds several adapters {sorted(map(str, adapters))}; keep one")
        if not halves:
            raise CheckpointError(f"LoRA {path} holds no lora_A/lora_B tensors; is it a LoRA file?")

        meta = f.metadata() or {}
        meta_alpha = next(((k, meta[k]) for k in METADATA_ALPHA_KEYS if k in meta), None)
        if meta_alpha is not None:
            base_alpha, source = _parse_alpha(meta_alpha[1], path, meta_alpha[0]), "metadata"
        elif alpha is not None:
            base_alpha, source = float(alpha), "argument"
        else:
            base_alpha, source = float(default_alpha), "default"

        pairs, ranks, alphas = {}, {}, {}
        for mod in sorted(halves):
            slot = halves[mod]
            if set(slot) != {"A", "B"}:
                missing = "lora_B" if "A" in slot else "lora_A"
                raise CheckpointError(f"LoRA {path}: {next(iter(slot.values()))} has no matching {missing}; "
                                      "the file is incomplete")
            a_shape = f.get_slice(slot["A"]).get_shape()  # [r, in]
            b_shape = f.get_slice(slot["B"]).get_shape()  # [out, r]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CheckpointError(f"LoRA {path}: {slot['A']} {list(a_shape)} and {slot['B']} {list(b_shape)} "
                                      "are not a rank-r pair [r, in] / [out, r]")
            pairs[mod] = (slot["A"], slot["B"])
            ranks[mod] = int(a_shape[0])
            alphas[mod] = base_alpha
            if mod in alpha_keys:
                alphas[mod] = float(f.get_tensor(alpha_keys[mod]).float().reshape(-1)[0].item())
                if not (math.isfinite(alphas[mod]) and alphas[mod] > 0):
                    raise CheckpointError(f"LoRA {path}: {alpha_keys[mod]} is {alphas[mod]}, not a positive "
                                          "number; fix the file")
                source = "tensor"
        stray = sorted(set(alpha_keys) - set(pairs))
        if stray:
            raise CheckpointError(f"LoRA {path}: {alpha_keys[stray[0]]} belongs to no lora_A/lora_B pair")
        return cls(path, pairs, ranks, alphas, source)

    @property
    def targets(self) -> dict[str, str]:
        """Base weight key (e.g. `blocks.0.self_attn.q.weight`) -> module name."""
        return {f"{mod}.weight": mod for mod in self._pairs}

    def scale(self, key: str) -> float:
        mod = self.targets[key]
        return self.alphas[mod] / self.ranks[mod]

    def summary(self) -> dict:
        """Rank, alpha and scale for a manifest (single values when uniform, else per-module maps)."""
        ranks = sorted(set(self.ranks.values()))
        alphas = sorted(set(self.alphas.values()))
        scales = sorted({self.alphas[m] / self.ranks[m] for m in self._pairs})
        one = lambda v: v[0] if len(v) == 1 else v  # noqa: E731
        return {"targets": len(self._pairs), "rank": one(ranks), "alpha": one(alphas), "scale": one(scales),
                "alpha_source": self.alpha_source}

    def check(self, shapes: dict[str, tuple]) -> None:
        """Every adapter must target an existing 2-D base weight of shape [out, in] = [B.out, A.in]."""
        with self._open(self.path) as f:
            self._check(f, shapes)

    def _check(self, f, shapes: dict[str, tuple]) -> None:
        for key, mod in self.targets.items():
            a_key, b_key = self._pairs[mod]
            if key not in shapes:
                raise CheckpointError(f"LoRA {self.path}: {b_key} targets {key}, which the base checkpoint does "
                                      "not have; this LoRA is for another model")
            want = tuple(shapes[key])
            r_in = f.get_slice(a_key).get_shape()[1]
            r_out = f.get_slice(b_key).get_shape()[0]
            if want != (r_out, r_in):
                raise CheckpointError(f"LoRA {self.path}: {b_key} gives a delta of shape [{r_out}, {r_in}] but "
                                      f"{key} is {list(want)}; this LoRA does not fit the checkpoint")

    def pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [r, in], B [out, r]) of the adapter on base weight `key`, read into fp32 host tensors (every byte
        read on return, the file closed again); None if `key` is not a target."""
        mod = self.targets.get(key)
        if mod is None:
            return None
        a_key, b_key = self._pairs[mod]
        with self._open(self.path) as f:  # opened per layer: the mapping (and its RSS) ends with the call
            # copy=True: an fp32 file would otherwise give views of the memory map, read only when touched
            return f.get_tensor(a_key).to(torch.float32, copy=True), f.get_tensor(b_key).to(torch.float32, copy=True)

    def merge(self, key: str, weight: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
        """W + scale * (B @ A), computed in float32 on weight's device and cast back to weight.dtype; W itself if
        not a target. pair: this key's `pair(key)` when already read (the converter reads it on its reader thread)."""
        mod = self.targets.get(key)
        if mod is None:
            return weight
        a, b = pair if pair is not None else self.pair(key)
        a = a.to(device=weight.device, dtype=torch.float32)  # [r, in]
        b = b.to(device=weight.device, dtype=torch.float32)  # [out, r]
        alpha = self.alphas[mod] / self.ranks[mod]
        out = torch.empty_like(weight)  # [out, in]
        step = max(1, MERGE_CHUNK // max(weight.shape[1], 1))  # row blocks bound the fp32 scratch
        for r0 in range(0, weight.shape[0], step):
            rows = slice(r0, r0 + step)
            out[rows] = torch.addmm(weight[rows].float(), b[rows], a, alpha=alpha)
        return out
