"""Click classes whose commands print a mistake as one `error: ...` line and exit with code 2: a LowvramError
raised by the library, and click's own usage errors (a value out of range, a missing option, an unknown
choice), which click would otherwise print as a usage block of several lines."""

from __future__ import annotations

import click

from lowvram.errors import LowvramError


class OneLineUsageError(click.UsageError):
    def show(self, file=None) -> None:
        where = f"; see `{self.ctx.command_path} --help`" if self.ctx is not None else ""
        click.echo(f"error: {' '.join(self.format_message().split()).rstrip('.')}{where}", err=True)


class OneLineErrors:
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            if isinstance(e, OneLineUsageError):
                raise
            raise OneLineUsageError(e.format_message(), e.ctx) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LowvramError as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            ctx.exit(e.exit_code)


class Command(OneLineErrors, click.Command):
    """A command that keeps the one-line errors when run on its own (tests, other entry points)."""


class Group(OneLineErrors, click.Group):
    """The `lowvram` group; its commands are `Command`s."""

    command_class = Command
