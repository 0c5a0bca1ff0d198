"""Writes docs/cli.md from the click commands themselves: every command's usage line and every
option with its help and default, as `mlxkit COMMAND --help` prints them, so the reference
cannot drift from the code (tests/test_cli_docs.py checks it). A development script: it lives
outside the package, so the wheel does not ship it.

    python tools/make_cli_docs.py          # rewrite docs/cli.md
    python tools/make_cli_docs.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from mlxkit.cli import main as mlxkit_main

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 100  # the help text's width: fixed, so the page does not depend on the terminal

INTRO = """# Command line reference

Generated from the click commands by `python tools/make_cli_docs.py` (a test checks that this
page equals its output): every command and every option, as `mlxkit COMMAND --help` prints
them. `python -m mlxkit` is the same command.

- `PATH` (`--model`, `info`) is a model directory in either layout (Hugging Face or MLX), an
  iPhone bundle, or `micro`; `--size` is `0.8b`, `2b`, `4b`, `9b` (through the Hugging Face
  cache; offline, the entry point's directory option instead) or `micro`, the small model
  shipped in the package.
- The planning and quantization options that `plan`, `convert` and `bundle build` share with
  `--target` and `--memory-budget` are defined once, in `ios_bridge/settings.py`. `convert`
  takes them without a target too, except those only a plan reads (`--context`,
  `--entitlement`, `--num-draft`, `--prefill-chunk`, `--acceptance`, `--image-tokens`,
  `--vision-encoder`, `--coreml-grids`), which need `--target` or `--memory-budget`.
- Errors a user can cause (a bad file, path or option, including options click cannot parse)
  print one line on stderr and exit with code 2, and leave nothing on disk. `bundle verify`
  exits 1, with one `bundle FAILED: …` line on stderr, when a check fails; what it checks is
  in [verification.md](verification.md).
"""


def contexts(
    command: click.Command = mlxkit_main, parent: click.Context | None = None
) -> Iterator[click.Context]:
    """A context for every command and group under `mlxkit`, depth first, in the order `--help`
    lists them; each inherits its parent's settings (-h, the width) as on the command line."""
    if parent is None:
        ctx = click.Context(
            command,
            info_name="mlxkit",
            terminal_width=WIDTH,
            max_content_width=WIDTH,
            **command.context_settings,
        )
    else:
        ctx = click.Context(
            command, info_name=command.name, parent=parent, **command.context_settings
        )
    yield ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            yield from contexts(command.commands[name], ctx)


def render() -> str:
    sections = [INTRO]
    for ctx in contexts():
        sections.append(f"## `{ctx.command_path}`\n\n```text\n{ctx.get_help()}\n```\n")
    return "\n".join(sections)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is stale")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python tools/{Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
