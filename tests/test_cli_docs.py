"""The README documents the commands as they are: its "## Command line" synopsis names every
option of every command (and none that does not exist), and its server example runs and
prints an answer (issue 21 item 9: the synopsis had left out `bundle build`, --image/--video,
--no-load and several convert, serve and export-coreml options; the image example printed
an empty `content` because thinking was on)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import click
import pytest

from mlxkit.cli import main
from tests.helpers import FIXTURES
from tests.serve_helpers import Server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHARED = "PLANNING"  # the synopsis' name for the options plan, convert and bundle build share
OPTION = re.compile(r"(?<![\w-])(--?[a-z][\w-]*)")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def synopsis() -> dict[tuple[str, ...], str]:
    """The synopsis' entries by command path (() for `mlxkit` itself), comments dropped and
    PLANNING expanded to its definition."""
    block = re.search(r"```sh\n(.*?)```", section("Command line"), re.DOTALL).group(1)
    entries: dict[tuple[str, ...], list[str]] = {}
    current = None
    for line in block.splitlines():
        text = line.split("#")[0]
        if line.startswith("mlxkit"):
            current = tuple(_command_path(text.split()[1:]))
            entries[current] = []
        elif line.startswith(f"{SHARED} ="):
            current = (SHARED,)
            entries[current] = []
            text = text.split("=", 1)[1]
        elif not line.startswith(" "):
            current = None
        if current is not None:
            entries[current].append(text)
    shared = " ".join(entries.pop((SHARED,), []))
    return {path: " ".join(lines).replace(SHARED, shared) for path, lines in entries.items()}


def _command_path(words: list[str]) -> list[str]:
    path, group = [], main
    for word in words:
        if not isinstance(group, click.Group) or word not in group.commands:
            break
        path.append(word)
        group = group.commands[word]
    return path


def commands(group: click.Command = main, path: tuple[str, ...] = ()):
    yield path, group
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from commands(command, (*path, name))


def test_the_synopsis_names_every_option_of_every_command():
    documented = synopsis()
    missing = []
    for path, command in commands():
        if isinstance(command, click.Group) and path:
            continue  # `mlxkit bundle` only groups build and verify
        text = documented.get(path)
        if text is None:
            missing.append(" ".join(("mlxkit", *path)))
            continue
        named = set(OPTION.findall(text))
        for option in command.params:
            if not isinstance(option, click.Option):
                continue
            if not named & set(option.opts) or (
                option.secondary_opts and not named & set(option.secondary_opts)
            ):
                missing.append(f"mlxkit {' '.join(path)} {'/'.join(option.opts)}")
    assert not missing, f"not in the README's synopsis: {missing}"


def test_the_synopsis_names_no_option_a_command_lacks():
    by_path = dict(commands())
    unknown = []
    for path, text in synopsis().items():
        real = {o for p in by_path[path].params for o in (*p.opts, *p.secondary_opts)}
        unknown += [f"mlxkit {' '.join(path)} {o}" for o in OPTION.findall(text) if o not in real]
    assert not unknown


# ------------------------------------------------------------------ the server example


@pytest.fixture(scope="module")
def server():
    s = Server("--size", "micro", "--max-tokens", "256")
    yield s
    assert s.stop() == 0, "".join(s.log)


def test_the_server_example_runs_and_prints_answers(server, tmp_path, monkeypatch):
    """The README's Python client example, as written but for the port, the picture (the
    vision fixture's, as receipt.png) and shorter answers (16 tokens, to keep the suite fast):
    the picture's answer is text, and printed."""
    code = re.search(r"```python\n(.*?)```", section("Server (OpenAI-compatible)"), re.DOTALL)
    source = code.group(1).replace("http://127.0.0.1:8080", server.url)
    source, answers = re.subn(r"max_tokens=\d+", "max_tokens=16", source)
    assert server.url in source and answers == 2
    picture = FIXTURES / "tiny_vision_p4" / "image0.png"
    (tmp_path / "receipt.png").write_bytes(picture.read_bytes())
    monkeypatch.chdir(tmp_path)
    out, names = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(source, "README.md", "exec"), names)  # noqa: S102 - the README's own code
    answer = names["r"].choices[0].message.content
    assert answer.strip() and out.getvalue().endswith(answer + "\n"), out.getvalue()
