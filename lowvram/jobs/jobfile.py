"""Jobs files for `lowvram batch`: TOML, CSV or JSONL, chosen by the file's extension.

    # jobs.toml                         # jobs.csv                      # jobs.jsonl
    [[job]]                             image,audio,prompt,seed         {"image": "a.png", "audio": "a.wav",
    image = "a.png"                     a.png,a.wav,A woman talking,1    "prompt": "A woman talking"}
    audio = "a.wav"
    prompt = "A woman talking"

Keys are `lowvram run`'s option names (lowvram.jobs.options); the command line's options are the
defaults under every row; relative paths resolve against the jobs file's folder. A row without
`out` writes `<jobs file stem>-<row>.mp4` into the output folder. Any problem is one LowvramError
naming the file, the row (1-based; in a CSV the header is line 1 and row 1 is line 2) and the key.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from lowvram.errors import LowvramError
from lowvram.jobs.options import parse_row, to_run_options
from lowvram.pipeline.options import RunOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 ships no TOML reader; tomli is the same parser under its PyPI name
    import tomli as tomllib

KINDS = (".toml", ".csv", ".jsonl")


def _rows_toml(path: Path) -> list[dict]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LowvramError(f"{path}: not valid TOML ({e})") from None
    extra = sorted(set(data) - {"job"})
    if extra or not isinstance(data.get("job", []), list):
        raise LowvramError(f"{path}: a TOML jobs file holds only [[job]] tables (found {', '.join(extra) or 'job ='})")
    return data.get("job", [])


def _rows_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = []
        for i, row in enumerate(reader, 1):
            if None in row:
                raise LowvramError(f"{path} row {i}: more cells than the header has columns")
            if any(v is None for v in row.values()):
                raise LowvramError(f"{path} row {i}: fewer cells than the header has columns")
            if any(v.strip() for v in row.values()):
                rows.append(row)
            else:
                rows.append({})  # a blank line keeps its number so that later rows keep theirs
    return rows


def _rows_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            rows.append({})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowvramError(f"{path} row {i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise LowvramError(f"{path} row {i}: each line must be a JSON object of option names")
        rows.append(row)
    return rows


def read_jobs(path, defaults: dict | None = None, out_dir: Path | None = None) -> list[RunOptions]:
    """The jobs of `path` in file order, each the command line's `defaults` overlaid with its row."""
    path = Path(path)
    if path.suffix.lower() not in KINDS:
        raise LowvramError(f"{path}: a jobs file must end in {', '.join(KINDS)} (got {path.suffix or 'no extension'})")
    if not path.is_file():
        raise LowvramError(f"jobs file not found: {path}")
    reader = {".toml": _rows_toml, ".csv": _rows_csv, ".jsonl": _rows_jsonl}[path.suffix.lower()]
    base = path.resolve().parent
    out_dir = Path(out_dir) if out_dir is not None else base
    jobs, seen = [], {}
    for i, row in enumerate(reader(path), 1):
        if not row:
            continue
        where = f"{path} row {i}"
        if not isinstance(row, dict):
            raise LowvramError(f"{where}: a job must be a table of option names")
        values = {**(defaults or {}), **parse_row(row, where, base)}
        values.setdefault("out", out_dir / f"{path.stem}-{i}.mp4")
        opts = to_run_options(values, where)
        key = Path(opts.out).resolve()
        if key in seen:
            raise LowvramError(f"{where}: out {opts.out} is also the out of row {seen[key]}; give each job its own out")
        seen[key] = i
        jobs.append(opts)
    if not jobs:
        raise LowvramError(f"{path}: no jobs in the file")
    return jobs
