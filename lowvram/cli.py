"""The `lowvram` command line: a thin layer whose commands each call one library function.

User mistakes raise `LowvramError`; `main` prints them as one line and exits with code 2.
"""

from __future__ import annotations

import sys

import click

from lowvram.errors import LowvramError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LowvramError as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lowvram")
def cli():
    """Live Avatar (Wan2.2-S2V-14B + LiveAvatar LoRA) on a 24 GB card."""


def main(argv=None):
    return cli.main(args=argv, prog_name="lowvram")


if __name__ == "__main__":
    sys.exit(main())
