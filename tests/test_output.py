"""convert/output.py: replacing an output atomically, and cleaning up after killed runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlxkit.convert import output


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def folder(path, text: str):
    path.mkdir()
    (path / "f").write_text(text)
    return path


@pytest.mark.parametrize("can_swap", [True, False], ids=["swap", "two renames"])
def test_replace_puts_the_new_output_in_and_removes_the_old(tmp_path, monkeypatch, can_swap):
    if not can_swap:
        monkeypatch.setattr(output, "_swap", lambda a, b: False)
    out = folder(tmp_path / "out", "old")
    output.replace_dir(folder(tmp_path / ".out.partial-1", "new"), out)
    assert (out / "f").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_swap_is_one_exchange_where_the_system_has_it(tmp_path):
    a, b = folder(tmp_path / "a", "a"), folder(tmp_path / "b", "b")
    if not output._swap(a, b):
        pytest.skip(f"this file system cannot swap ({sys.platform}): the fallback is tested")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_leftovers_of_dead_runs_go_and_those_of_live_ones_stay(tmp_path):
    out = folder(tmp_path / "out", "current")
    dead, live = dead_pid(), os.getppid()
    for kind in ("partial", "building", "old"):
        folder(tmp_path / f".out.{kind}-{dead}", kind)
    folder(tmp_path / f".out.partial-{live}", "running")
    folder(tmp_path / f".other.partial-{dead}", "another output's")
    removed = output.remove_leftovers(out)
    assert sorted(p.name for p in removed) == sorted(
        f".out.{k}-{dead}" for k in ("partial", "building", "old")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f".out.partial-{live}", f".other.partial-{dead}"]
    )
    assert (out / "f").read_text() == "current"


def test_an_old_output_moved_aside_is_put_back_when_none_replaced_it(tmp_path):
    """A kill between the two renames of the fallback leaves OUT aside: the next run puts
    it back before anything else."""
    out = tmp_path / "out"
    folder(tmp_path / f".out.old-{dead_pid()}", "old")
    output.remove_leftovers(out)
    assert (out / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
