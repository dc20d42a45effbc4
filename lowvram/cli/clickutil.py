"""Click classes whose commands print a LowvramError as one `error: ...` line and exit with its code (2)."""

from __future__ import annotations

import click

from lowvram.errors import LowvramError


class OneLineErrors:
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LowvramError as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            ctx.exit(e.exit_code)


class Group(OneLineErrors, click.Group):
    """The `lowvram` group."""


class Command(OneLineErrors, click.Command):
    """A command that keeps the one-line errors when run on its own (tests, other entry points)."""
