"""Checks for the Hugging Face folders of the checkpoint (wav2vec2, the umT5 tokenizer) before transformers
reads them, so that a garbage file is named in one line instead of surfacing as a transformers traceback,
and a quiet context for the loads themselves (lowvram reports what went wrong; transformers' load report
and progress bars would only add noise)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from lowvram.errors import CheckpointError


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; CheckpointError naming the file when it is unreadable or not an object.
    `what` says what to re-download (e.g. "the wav2vec2-large-xlsr-53-english folder")."""
    try:
        raw = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); check its permissions or re-download "
                              f"{what}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__} at byte {getattr(e, 'pos', 0)}); "
                              f"re-download {what}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object; re-download {what}")
    return raw


def check_json_files(folder: Path, what: str) -> None:
    """Every *.json file directly in `folder` must be a readable JSON object."""
    for path in sorted(Path(folder).glob("*.json")):
        read_json_object(path, what)


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed, cut at `limit`), for a one-line error."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def quiet_transformers():
    """Silence transformers' warnings (its load report) and progress bars for the duration; restored after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
