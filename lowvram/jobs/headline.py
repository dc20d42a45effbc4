"""The plan's headline for the page, before anything loads: resident blocks, KV placement, expected peak
(`plan_run`, the same plan `lowvram plan` prints and the job executes)."""

from __future__ import annotations

import dataclasses

from lowvram.errors import LowvramError

NO_PROFILE = "none"   # the page's name for "no profile: everything resident, checkpoint precision"


def generated_size(image_path, size: str) -> str:
    """"W*H" the run will generate for this portrait under the --size budget (W:H's aspect without one)."""
    from lowvram.runtime.plan import resolve_size

    w, h = resolve_size(size, image_path or None)
    return f"{w}*{h}"


def plan_headline(ckpt_dir, profile: str | None, size: str, overrides=(), image_path=None) -> str:
    """One line; a LowvramError's message when the plan cannot be made (shown instead of a headline)."""
    try:
        from lowvram.runtime.plan import plan_run

        wh = generated_size(image_path, size)
        name = None if not profile or profile == NO_PROFILE else profile
        plan = plan_run(ckpt_dir, name, tuple(overrides), size, image_path or None)
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
