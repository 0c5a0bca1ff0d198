"""Every command and Python snippet in README.md and docs/ works as written (issue 25 item 4):
each ```sh and ```python block either runs offline against micro, or says on the line before
it what it needs instead (`<!-- snippet: needs a real checkpoint -->`, a Mac, a server, a
benchmark run). The quickstart is run by tests/test_quickstart.py (and .ci/run), the server
page's client by tests/test_cli_docs.py. Blocks without a language (a signature, a file tree)
are not code.

The default run checks the marks, that every Python snippet compiles and that every `mlxkit`
command in any block names a real command with options of the right type (click parses it
without running it); the slow test runs the unmarked blocks. `pip install` lines are the
environment these tests run in, so they are not run again."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from mlxkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(sh|python)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
MARK = re.compile(r"<!-- snippet: needs (a real checkpoint|a Mac|a server|a benchmark run)\b")
QUICKSTART = "<!-- quickstart:begin -->"
PRINTF = re.compile(r"\"\$\(printf '[^']*'\)\"")


def snippets() -> list[tuple[str, str, str, str]]:
    """(where, language, code, the line before the fence) for every block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            where = f"{page.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
            found.append((where, m.group(1), m.group(2), before))
    return found


def runnable() -> list[tuple[str, str, str]]:
    return [
        (where, language, code)
        for where, language, code, before in snippets()
        if not MARK.search(before) and before != QUICKSTART
    ]


def mlxkit_commands(code: str) -> list[list[str]]:
    """The argument lists of the `mlxkit` commands in a shell block (continued lines joined,
    comments dropped, `&&` chains split; the quickstart's lines start after their comment)."""
    commands: list[list[str]] = [[]]
    for line in code.replace("\\\n", " ").splitlines():
        if not line.startswith(("mlxkit ", "pip ")):
            continue  # other programs' lines (curl's JSON spans lines)
        line = PRINTF.sub("TEXT", line)  # shlex does not know $(…)'s own quoting
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word == "&&":
                commands.append([])
            else:
                commands[-1].append(word)
    return [words[1:] for words in commands if words and words[0] == "mlxkit"]


def parse(args: list[str]) -> None:
    """Parse `mlxkit ARGS` with click down to the command, without running it. The groups'
    contexts take their context settings (-h) as on the command line: click keeps the first
    help option a command is given, and docs/cli.md's test renders it later in this process."""
    command, name, parent = main, "mlxkit", None
    while isinstance(command, click.Group) and args and args[0] in command.commands:
        parent = click.Context(command, info_name=name, parent=parent, **command.context_settings)
        name, args = args[0], args[1:]
        command = command.commands[name]
    command.make_context(name, list(args), parent=parent)


def test_every_snippet_runs_here_or_says_what_it_needs():
    blocks = snippets()
    assert len(blocks) >= 15 and sum(before == QUICKSTART for *_, before in blocks) == 1
    python = {where.split(":")[0] for where, language, _ in runnable() if language == "python"}
    assert python == {"README.md", "docs/python-api.md"}, python
    for where, language, code, _ in blocks:
        if language == "python":
            ast.parse(code, where)


def test_every_mlxkit_command_in_the_docs_parses():
    """Each names a real command with real options and values click accepts (required
    options present), in every block, marked or not."""
    bad = []
    for where, language, code, _ in snippets():
        for args in mlxkit_commands(code) if language == "sh" else []:
            try:
                parse(args)
            except click.ClickException as e:
                bad.append(f"{where}: mlxkit {' '.join(args)}: {e.format_message()}")
    assert not bad


def test_a_wrong_option_fails_the_parse():
    with pytest.raises(click.NoSuchOption):
        parse(["plan", "--size", "micro", "--target", "iphone15", "--no-such"])
    parse(["plan", "--size", "micro", "--target", "iphone15"])


@pytest.mark.slow
@pytest.mark.parametrize("where, language, code", runnable(), ids=lambda v: str(v)[:30])
def test_the_unmarked_snippets_run_against_micro(where, language, code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if language == "python":
        argv = [sys.executable, "-c", code]
    else:
        lines = [line for line in code.splitlines() if not line.startswith("pip install")]
        argv = ["sh", "-ec", "\n".join(lines)]
    result = subprocess.run(
        argv, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (where, result.stderr[-2000:])


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_link_between_the_pages_resolves():
    """Each relative link in README.md and docs/ names a file that exists and, with #anchor,
    a heading on that page (the README's reference moved to docs/ in pieces)."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]*)(#[^)]*)?\)", page.read_text()):
            path, anchor = target
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and anchor[1:] not in anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {path}{anchor}")
    assert not broken
