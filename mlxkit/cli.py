"""The `mlxkit` command. Subcommands live beside the code they drive; this file wires them up
and turns every MlxkitError into one line on stderr with exit code 2."""

from __future__ import annotations

import sys

import click

from mlxkit import __version__
from mlxkit.errors import MlxkitError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlxkitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxkit")
def main() -> None:
    """Qwen 3.5 small models on MLX: convert, plan for an iPhone, bundle, generate."""


@main.command()
@click.argument("path")
def info(path: str) -> None:
    """Print a checkpoint's config summary, parameter counts by part and bytes."""
    from mlxkit.info import checkpoint_info, format_info

    click.echo(format_info(checkpoint_info(path)))
