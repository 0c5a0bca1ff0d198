"""`convert()` is a library call: it logs its summary and writes nothing to stdout, while
`mlxkit convert` prints the same summary lines as before (issue 21 item 9)."""

from __future__ import annotations

import logging
import re

from click.testing import CliRunner
from mlxkit.convert import convert

from mlxkit.cli import main
from tests.helpers import FIXTURES


def summary_pattern(out) -> re.Pattern:
    return re.compile(
        rf"wrote {re.escape(str(out))} \([\d.]+ [KMG]B: embeddings .*\)\n"
        r"4-bit affine, group 64; \d+\.\d\d bits per weight; \d+ tensors\n"
        r"\d+\.\d s, peak memory [\d.]+ [KMG]B\n"
        rf"MTP drafter in {re.escape(str(out / 'mtp'))}\n"
    )


def test_convert_logs_its_summary_and_prints_nothing(tmp_path, capsys, caplog):
    out = tmp_path / "m"
    with caplog.at_level(logging.INFO, logger="mlxkit.convert"):
        convert(FIXTURES / "tiny_tied", out)
    captured = capsys.readouterr()
    assert captured.out == ""
    records = [r for r in caplog.records if r.name == "mlxkit.convert"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert summary_pattern(out).fullmatch(records[0].getMessage() + "\n")


def test_convert_quiet_logs_nothing(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="mlxkit.convert"):
        convert(FIXTURES / "tiny_tied", tmp_path / "m", quiet=True)
    assert capsys.readouterr().out == "" and not caplog.records


def test_the_command_prints_the_summary_on_stdout(tmp_path):
    out = tmp_path / "m"
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(FIXTURES / "tiny_tied"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert summary_pattern(out).fullmatch(result.stdout), result.stdout
    assert result.stderr == ""
    quiet = CliRunner().invoke(
        main,
        ["convert", "--hf-path", str(FIXTURES / "tiny_tied"), "-o", str(out), "--force", "--quiet"],
    )
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
