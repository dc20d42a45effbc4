"""Who does what in the timestep-forcing pipeline of `lowvram run --gpus N` (docs/model.md §3.8).

Step i of block b needs step i-1 of b and step i of b-1 (through step cache i), so a rank that owns
some denoising steps and their caches only ever waits on the owner of the step before its first one.
The rules, for S steps (4) and N ranks:
- N = S + 1: one DiT rank per step, and a last rank that decodes (VAE) and writes the mp4;
- N <= S: the steps are split into N contiguous groups, the larger groups first; the last DiT rank
  also decodes and writes. Its own group is then the smallest, so the rank that carries the VAE carries
  the fewest forwards (N = 3: steps {0,1}, {2}, {3}+VAE: a tick takes max(2F, F+V) = 2F, not 2F+V).
  With N = S the writer is the owner of the last step: the clean latents need no transfer;
- N = 1 is the single-process path (every step, the VAE and the writer).
Rank 0 runs the encoders (umT5, wav2vec2, VAE encode) and broadcasts the results: it is the head of the
pipeline, the first to need each block's audio, which then travels with the block's latents.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowvram.constants import NUM_STEPS
from lowvram.errors import LowvramError

MAX_GPUS = NUM_STEPS + 1


@dataclass(frozen=True)
class Role:
    """One rank: the denoising steps it runs (and whose caches it holds), whether it decodes and writes."""

    rank: int
    steps: tuple[int, ...]
    writes: bool = False  # decodes the clean latents (VAE) and writes the mp4
    encodes: bool = False  # runs umT5, wav2vec2 and the VAE encode, broadcasts their results

    def describe(self) -> str:
        parts = []
        if self.steps:
            parts.append(f"step{'s' if len(self.steps) > 1 else ''} {_span(self.steps)} (DiT + step cache"
                         f"{'s' if len(self.steps) > 1 else ''})")
        if self.encodes:
            parts.append("encoders (umT5, wav2vec2, VAE encode)")
        if self.writes:
            parts.append("VAE decode + mp4 writer")
        return ", ".join(parts)


def _span(steps: tuple[int, ...]) -> str:
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def assign_roles(world: int, steps: int = NUM_STEPS) -> tuple[Role, ...]:
    """The role of every rank for `world` ranks and `steps` denoising steps (module docstring)."""
    if world < 1:
        raise LowvramError(f"--gpus must be at least 1 (got {world})")
    if world > steps + 1:
        raise LowvramError(f"--gpus {world}: a run of {steps} step(s) uses at most {steps + 1} GPUs (one per "
                           f"denoising step and one for the VAE and the writer); use --gpus {steps + 1} or fewer")
    dit = min(world, steps)
    base, extra = divmod(steps, dit)
    groups, start = [], 0
    for r in range(dit):
        n = base + (1 if r < extra else 0)
        groups.append(tuple(range(start, start + n)))
        start += n
    roles = [Role(r, groups[r], writes=world == dit and r == dit - 1, encodes=r == 0) for r in range(dit)]
    if world > dit:
        roles.append(Role(dit, (), writes=True))
    return tuple(roles)


@dataclass(frozen=True)
class Pipeline:
    """The roles of one run and the questions every rank asks of them."""

    roles: tuple[Role, ...]
    steps: int

    @classmethod
    def of(cls, world: int, steps: int = NUM_STEPS) -> "Pipeline":
        return cls(assign_roles(world, steps), steps)

    @property
    def world(self) -> int:
        return len(self.roles)

    @property
    def writer(self) -> int:
        return next(r.rank for r in self.roles if r.writes)

    def owner(self, step: int) -> int:
        """The rank that runs denoising step `step`."""
        return next(r.rank for r in self.roles if step in r.steps)

    def upstream(self, rank: int) -> int | None:
        """Where this rank's first step gets its input (None: step 0 starts from noise)."""
        steps = self.roles[rank].steps
        if steps:
            return None if steps[0] == 0 else self.owner(steps[0] - 1)
        return self.owner(self.steps - 1)  # the VAE rank: the clean latents

    def downstream(self, rank: int) -> int | None:
        """Where this rank's last step's output goes (None: it stays here, for this rank's writer)."""
        last = self.roles[rank].steps[-1]
        dst = self.owner(last + 1) if last + 1 < self.steps else self.writer
        return None if dst == rank else dst

    def table(self, devices: list[str] | None = None) -> list[tuple[str, str, str]]:
        """(rank, device, role) rows for `lowvram plan --gpus N`."""
        devices = devices or [f"cuda:{r.rank}" for r in self.roles]
        return [(str(r.rank), devices[r.rank], r.describe()) for r in self.roles]
