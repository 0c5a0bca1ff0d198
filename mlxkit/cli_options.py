"""Click option types shared by `mlxkit generate` and `mlxkit serve` (click only: the command
starts without importing MLX)."""

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
