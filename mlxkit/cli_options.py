"""Click option types and options shared by `mlxkit generate`, `eval` and `serve` (click only:
the command starts without importing MLX)."""

from __future__ import annotations

import click


class NumDraft(click.ParamType):
    """--num-draft: "auto" or an integer (its range is stream_generate's to check)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f'{value!r} is not "auto" or an integer', param, ctx)


def kv_cache_options(bits_help: str):
    """--kv-bits, --kv-group-size and --quantized-kv-start, in that order; `bits_help` says what
    the setting means for the command."""
    options = [
        click.option("--kv-bits", type=int, default=None, help=bits_help),
        click.option("--kv-group-size", default=64, show_default=True, help="With --kv-bits."),
        click.option(
            "--quantized-kv-start",
            default=0,
            show_default=True,
            help="With --kv-bits: positions kept in full precision before the cache is quantized.",
        ),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate
