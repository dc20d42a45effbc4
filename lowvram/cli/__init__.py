"""The `lowvram` command line (`lowvram.cli.main:main`): thin commands, each calling one library function."""
