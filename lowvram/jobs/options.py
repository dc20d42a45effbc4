"""`lowvram run`'s option names as jobs files and job JSON hold them, mapped to `RunOptions` fields.

A key is an option name of `lowvram run` without the dashes, with `-` or `_` (`num-clip`, `num_clip`);
`set` is `--set` (a list, or one string of KEY=VALUE items separated by spaces or `;`), `no_verify`
is `--no-verify`. Values are typed here, so a CSV cell "7" and a TOML integer 7 give the same job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lowvram.errors import LowvramError
from lowvram.pipeline.options import RunOptions

PATHS = ("ckpt_dir", "lora", "image", "audio", "out")
INTS = ("num_clip", "seed", "steps")
FLOATS = ("lora_alpha",)
FLAGS = ("online_decode", "no_verify")
TEXTS = ("prompt", "size", "device", "dtype", "attention", "t5", "profile")
LISTS = ("set",)
KEYS = PATHS + INTS + FLOATS + FLAGS + TEXTS + LISTS
# what decides the pixels of the video: a complete output made with other values is redone
CONTENT = ("ckpt_dir", "lora", "lora_alpha", "image", "audio", "prompt", "size", "num_clip", "seed", "steps",
           "online_decode")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def normalize_key(key: str) -> str:
    return str(key).strip().lower().replace("-", "_")


def _typed(key: str, value, where: str):
    bad = f"{where}: {key}={value!r}"
    if key in INTS:
        if isinstance(value, bool) or not (isinstance(value, int) or str(value).strip().lstrip("-").isdigit()):
            raise LowvramError(f"{bad} is not an integer")
        return int(value)
    if key in FLOATS:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise LowvramError(f"{bad} is not a number") from None
    if key in FLAGS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in _TRUE + _FALSE:
            raise LowvramError(f"{bad} is not true or false")
        return text in _TRUE
    if key in LISTS:
        items = value if isinstance(value, (list, tuple)) else str(value).replace(";", " ").split()
        items = [str(i).strip() for i in items if str(i).strip()]
        for item in items:
            if "=" not in item:
                raise LowvramError(f"{where}: set item {item!r} is not KEY=VALUE")
        return tuple(items)
    if isinstance(value, (dict, list)):
        raise LowvramError(f"{bad} must be a single value")
    return str(value)


def parse_row(row: dict, where: str, base: Path | None = None) -> dict:
    """A jobs-file row -> typed values by option name (empty CSV cells dropped); relative paths
    resolve against `base` (the jobs file's folder). Unknown keys are errors naming `where`."""
    out = {}
    for raw_key, value in row.items():
        key = normalize_key(raw_key)
        if key not in KEYS:
            raise LowvramError(f"{where}: {raw_key!r} is not a lowvram run option; use one of {', '.join(KEYS)}")
        if value is None or (isinstance(value, str) and not value.strip() and key not in FLAGS):
            continue
        value = _typed(key, value, where)
        if key == "profile" and value.strip().lower() == "none":
            value = None  # everything resident, as `lowvram run` without --profile
        if key in PATHS:
            p = Path(value).expanduser()
            value = p if p.is_absolute() or base is None else base / p
        out[key] = value
    return out


def to_run_options(values: dict, where: str) -> RunOptions:
    """Typed option values (parse_row, CLI defaults underneath) -> RunOptions; names the missing key."""
    for key in ("image", "audio", "prompt", "ckpt_dir"):
        if key not in values:
            raise LowvramError(f"{where}: {key} is missing; every job needs image, audio, prompt and ckpt_dir "
                               "(in the row or on the command line)")
    kw = {k: v for k, v in values.items() if k not in ("set", "no_verify")}
    kw["overrides"] = tuple(values.get("set", ()))
    kw["verify"] = not values.get("no_verify", False)
    return RunOptions(**kw)


def options_to_json(opts: RunOptions) -> dict:
    """RunOptions -> a JSON-ready dict of its fields (paths as strings, overrides as a list)."""
    d = {}
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        d[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return d


def options_from_json(d: dict) -> RunOptions:
    names = {f.name for f in dataclasses.fields(RunOptions)}
    kw = {k: v for k, v in d.items() if k in names}
    for k in PATHS:
        if kw.get(k) is not None:
            kw[k] = Path(kw[k])
    kw["overrides"] = tuple(kw.get("overrides", ()))
    return RunOptions(**kw)
