"""The plan's headline for the page, before anything loads: resident blocks, KV placement, expected peak.

Hook: issue 10's `lowvram.pipeline.session.plan_for(opts) -> Plan` plans a RunOptions without loading
weights; once it lands, `plan_headline` is `plan_for(opts).headline()` (with the same error handling).
Until then it plans with `lowvram plan`'s own function for the size the portrait will generate.
"""

from __future__ import annotations

import dataclasses

from lowvram.errors import LowvramError

NO_PROFILE = "none"   # the page's name for "no profile: everything resident, checkpoint precision"


def generated_size(image_path, size: str) -> str:
    """"W*H" the run will generate for this portrait under the --size budget (size as given without one)."""
    from PIL import Image

    from lowvram.io.media import gen_size, parse_size

    area = parse_size(size)
    if not image_path:
        return size
    try:
        with Image.open(image_path) as im:
            w, h = gen_size(im.width, im.height, area)
    except (OSError, ValueError):
        return size
    return f"{w}*{h}"


def plan_headline(ckpt_dir, profile: str | None, size: str, overrides=(), image_path=None) -> str:
    """One line; a LowvramError's message when the plan cannot be made (shown instead of a headline)."""
    try:
        wh = generated_size(image_path, size)
        if not profile or profile == NO_PROFILE:
            return f"{wh.replace('*', 'x')}: no profile, everything resident in the checkpoint's precision"
        from lowvram.cli.plan import plan_for_checkpoint

        plan = plan_for_checkpoint(profile, ckpt_dir, wh, tuple(overrides))
        return f"{wh.replace('*', 'x')}: {plan.headline()}"
    except LowvramError as e:
        return f"cannot plan: {' '.join(str(e).split())}"
    except OSError as e:
        return f"cannot plan: {e.strerror or e} ({getattr(e, 'filename', '') or ''})"


def profile_fields(profile: str | None, overrides=()) -> str:
    """The profile's fields as `key = value` lines (what the advanced overrides can change)."""
    if not profile or profile == NO_PROFILE:
        return "No profile selected: everything stays on the device. Pick a profile to override its fields."
    from lowvram.runtime.profile import Profile, parse_set

    try:
        p = Profile.from_name(profile, **parse_set(list(overrides)))
    except LowvramError as e:
        return f"cannot read profile: {' '.join(str(e).split())}"
    return "\n".join(f"{f.name} = {getattr(p, f.name)}" for f in dataclasses.fields(p) if f.name != "name")
