"""The README's quickstart tells one true story (issue 25 items 1 and 3): its block holds only
numbered `#` comments and commands, each line runnable in a shell of its own (`.ci/run` runs
them so) with no bash-only quoting; micro's sample completion parses as Python and ends at the
stop string, not at the token limit in the middle of a word; and every number that `plan`,
`convert --target`, `generate --verbose` and `bundle verify` print carries a unit or a label
saying what it counts."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.search(
    r"<!-- quickstart:begin -->\n```sh\n(.*?)```\n<!-- quickstart:end -->",
    (ROOT / "README.md").read_text(),
    re.DOTALL,
).group(1)
LINES = [line for line in BLOCK.splitlines() if line.strip()]
COMMANDS = [line for line in LINES if not line.startswith("#")]
# What may follow a number: its unit or the thing it counts.
UNIT = re.compile(
    r"\s?([A-Z]{2} cache )?(%|x\b|×|[KMG]i?B(/s)?\b|B/token\b|ms\b|s\b|tokens?(/s)?\b|drafts?\b|rounds?\b|"
    r"layers?\b|bits?\b|paths?\b|files?\b|tensors?\b|patches\b|vision tokens\b|GB\b|"
    r"/\d[\d,]* \w|per \w+|of \d|of them\b|-bit\b|-token\b|B\b|vision_tower\.)"
)
# What may come before a number: a name it belongs to (iPhone 15, k=1, x1.49) or a label.
LABEL = re.compile(
    r"(iPhone|Qwen|k=\d*|\bx|image|video|vision_start|vision_end|hidden|vocab|head dim|embeddings|"
    r"layers|mtp|temperature >|"
    r"schema|sha|iOS|M\d|mlx-swift-lm|\d[\d,.]*\s?(GB|MB|%)?\s?(of|->|>|/))"
    r"\s*$"
)
LIST = re.compile(r"(,| or) \d")
NUMBER = re.compile(r"(?<![\w.,])\d+(,\d{3})*(\.\d+)?(?!\d)")


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", "-c", command], check=False, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def unlabelled_numbers(text: str) -> list[str]:
    """Each number in `text` that has neither a unit after it nor a label before it, with the
    line it is on; in a list of numbers, the last one's unit covers the others."""
    bad = []
    for line in text.splitlines():
        for m in NUMBER.finditer(line):
            before, after = line[: m.start()], line[m.end() :]
            if LIST.match(after):
                continue  # "16, 8 or 4 bits": the list's last number says what they are
            if not UNIT.match(after) and not LABEL.search(before):
                bad.append(f"{m.group()!r} in {line.strip()!r}")
    return bad


def test_the_quickstart_is_numbered_commands_one_shell_each():
    comments = [line for line in LINES if line.startswith("#")]
    assert len(comments) == len(COMMANDS) >= 5
    for number, (comment, command) in enumerate(zip(LINES[::2], LINES[1::2]), 1):
        assert comment.startswith(f"# {number}. ") and not command.startswith("#"), comment
    assert "$'" not in BLOCK and "cd " not in BLOCK and "export " not in BLOCK
    assert 'pip install -e ".[dev]" && python -m pytest -q' in COMMANDS


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The quickstart's mlxkit commands, run as written in one empty folder, each in a shell
    of its own (the pip lines are the environment these tests already run in)."""
    cwd = tmp_path_factory.mktemp("quickstart")
    runs = {}
    for command in COMMANDS:
        if command.startswith("mlxkit "):
            runs[command.split()[1]] = result = _shell(command, cwd)
            assert result.returncode == 0, (command, result.stderr)
    assert set(runs) == {"plan", "convert", "generate", "bundle"}
    return runs


def test_micros_sample_parses_and_ends_at_its_stop(outputs):
    command = next(c for c in COMMANDS if c.startswith("mlxkit generate"))
    prompt = _shell(
        "printf %s " + re.search(r'--prompt ("\$\(printf .*?\)")', command).group(1), ROOT
    ).stdout
    max_tokens = int(re.search(r"--max-tokens (\d+)", command).group(1))
    completion = outputs["generate"].stdout.removesuffix("\n")
    ast.parse(prompt + completion)
    generated = int(re.match(r"(\d+) tokens, ", outputs["generate"].stderr).group(1))
    assert 0 < generated < max_tokens, "stopped by the token limit, not at the stop string"
    assert completion.endswith((")", "\n")), completion


def test_every_number_the_quickstart_prints_says_what_it_is(outputs):
    printed = "\n".join(
        [outputs["plan"].stdout, outputs["convert"].stdout, outputs["bundle"].stdout]
        + [outputs["generate"].stderr]
    )
    assert unlabelled_numbers(printed) == []


def test_a_bare_number_is_caught():
    assert unlabelled_numbers("decode: 823.3 tokens/s, peak 0.62 GB at 32,768 tokens") == []
    assert unlabelled_numbers("decode: 823.3 at 4") == [
        "'823.3' in 'decode: 823.3 at 4'",
        "'4' in 'decode: 823.3 at 4'",
    ]
