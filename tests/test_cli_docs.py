"""The documentation states the commands as they are: docs/cli.md is generated from the click
commands (tools/make_cli_docs.py) and must equal what the script writes now, naming every
option of every command; and the server page's Python example runs and prints an answer
(issue 21 item 9: a hand-written synopsis had left out `bundle build`, --image/--video,
--no-load and several convert, serve and export-coreml options; the image example printed
an empty `content` because thinking was on)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import click
import pytest

from tests.helpers import FIXTURES
from tests.serve_helpers import Server

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("make_cli_docs", ROOT / "tools" / "make_cli_docs.py")
make_cli_docs = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(make_cli_docs)


def test_docs_cli_md_is_the_generated_text():
    assert make_cli_docs.DOC.read_text() == make_cli_docs.render(), (
        "docs/cli.md is stale: run python tools/make_cli_docs.py"
    )


def test_docs_cli_md_names_every_option_of_every_command():
    """Per command section, each option's names (both sides of a --x/--no-x flag): an option
    marked hidden, which --help leaves out, would fail here."""
    page = make_cli_docs.DOC.read_text()
    missing = []
    for ctx in make_cli_docs.contexts():
        heading = f"## `{ctx.command_path}`\n"
        assert heading in page, heading
        text = page.split(heading, 1)[1].split("\n## ", 1)[0]
        for option in ctx.command.params:
            if isinstance(option, click.Option):
                missing += [
                    f"{ctx.command_path} {name}"
                    for name in (*option.opts, *option.secondary_opts)
                    if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)
                ]
    assert not missing


# ------------------------------------------------------------------ the server example


@pytest.fixture(scope="module")
def server():
    s = Server("--size", "micro", "--max-tokens", "256")
    yield s
    assert s.stop() == 0, "".join(s.log)


def test_the_server_example_runs_and_prints_answers(server, tmp_path, monkeypatch):
    """docs/serve.md's Python client example, as written but for the port, the picture (the
    vision fixture's, as receipt.png) and shorter answers (16 tokens, to keep the suite fast):
    the picture's answer is text, and printed."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "serve.md").read_text(), re.DOTALL)
    source = code.group(1).replace("http://127.0.0.1:8080", server.url)
    source, answers = re.subn(r"max_tokens=\d+", "max_tokens=16", source)
    assert server.url in source and answers == 2
    picture = FIXTURES / "tiny_vision_p4" / "image0.png"
    (tmp_path / "receipt.png").write_bytes(picture.read_bytes())
    monkeypatch.chdir(tmp_path)
    out, names = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(source, "docs/serve.md", "exec"), names)  # noqa: S102 - the page's own code
    answer = names["r"].choices[0].message.content
    assert answer.strip() and out.getvalue().endswith(answer + "\n"), out.getvalue()
