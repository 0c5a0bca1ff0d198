"""`kill -9` at random moments during `convert` and during `convert --target … --force` over
an existing bundle: OUT is always the old output or the new one, complete, byte for byte;
and the next run leaves no temporary folder behind (slow: a few minutes)."""

from __future__ import annotations

import filecmp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FIXTURES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
KILLS = 10  # real kills (of a process still running) per test, at least
ATTEMPTS = 60
SRC = FIXTURES / "tiny_untied"


def mlxkit(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "mlxkit", *args, "--quiet"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def run(*args: str, cwd: Path) -> None:
    proc = mlxkit(*args, cwd=cwd)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()


def same_tree(a: Path, b: Path) -> bool:
    if not (a.is_dir() and b.is_dir()):
        return False
    names = sorted(p.relative_to(a) for p in a.rglob("*"))
    if names != sorted(p.relative_to(b) for p in b.rglob("*")):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names if (a / n).is_file())


def temporaries(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def kill_at_random(
    args: list[str], cwd: Path, out: Path, rng: random.Random, timing: tuple[float, float]
) -> tuple[str, bool]:
    """Starts the command and kills it with SIGKILL at a random moment: half the time of the
    whole run, half the time of the part after its temporary folder appears (writing, then
    swapping). Returns when (for failure messages) and whether it was still running."""
    total, writing_from = timing
    proc = mlxkit(*args, cwd=cwd)
    t0 = time.monotonic()
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0, total))
    else:  # from the moment the temporary folder appears
        while proc.poll() is None and not temporaries(out.parent, out):
            time.sleep(0.001)
        time.sleep(rng.uniform(0, max(total - writing_from, 0.01)))
    delay = time.monotonic() - t0
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"{delay:.3f} s", proc.returncode == -signal.SIGKILL


def run_timing(args: list[str], cwd: Path, out: Path) -> tuple[float, float]:
    """(seconds of a whole run, seconds until its temporary folder appears)."""
    t0 = time.monotonic()
    proc = mlxkit(*args, cwd=cwd)
    while proc.poll() is None and not temporaries(out.parent, out):
        time.sleep(0.002)
    writing_from = time.monotonic() - t0
    proc.wait()
    return time.monotonic() - t0, writing_from


def kills_leave_old_or_new(
    tmp_path: Path, out: Path, args: list[str], old: Path | None, new: Path, seed: int
) -> None:
    """Runs `args` over `old` (None: no OUT yet) and kills it at random, again and again
    until KILLS kills landed while it ran: each time OUT is the old or the new output,
    complete, and a full rerun leaves the new one and no temporary folder."""
    rerun = args if "--force" in args else [*args, "--force"]
    timing = run_timing(rerun, tmp_path, out)
    rng, kills, left = random.Random(seed), 0, 0
    for i in range(ATTEMPTS):
        if kills == KILLS:
            break
        _restore(old, out)
        when, killed = kill_at_random(args, tmp_path, out, rng, timing)
        kills += killed
        left += bool(temporaries(out.parent, out))  # what the next run must clean up
        before = same_tree(out, old) if old is not None else not out.exists()
        assert before or same_tree(out, new), f"kill {i} at {when}"
        run(*rerun, cwd=tmp_path)
        assert same_tree(out, new) and temporaries(tmp_path, out) == [], f"kill {i} at {when}"
    print(f"{kills} kills in {i + 1} runs; {left} left a temporary folder for the next run")
    assert kills == KILLS and left > 0  # the cleanup was put to the test


def test_kill_during_convert_leaves_no_output_or_the_new_one(tmp_path):
    out = tmp_path / "out"
    args = ["convert", "--hf-path", str(SRC), "-o", str(out)]
    run(*args, cwd=tmp_path)
    new = tmp_path / "new"
    out.rename(new)
    kills_leave_old_or_new(tmp_path, out, args, None, new, seed=10)


def test_kill_during_convert_force_leaves_the_old_output_or_the_new_one(tmp_path):
    out = tmp_path / "out"
    old_args = ["convert", "--hf-path", str(SRC), "-o", str(out), "--bits", "8"]
    new_args = ["convert", "--hf-path", str(SRC), "-o", str(out), "--force"]
    old, new = _references(tmp_path, out, old_args, new_args)
    kills_leave_old_or_new(tmp_path, out, new_args, old, new, seed=11)


def test_kill_during_convert_target_force_over_a_bundle(tmp_path):
    out = tmp_path / "bundle"
    old_args = [
        "convert",
        "--hf-path",
        str(SRC),
        "--target",
        "iphone12",
        "-o",
        str(out),
        "--recipe",
        "uniform",
        "--bits",
        "8",
    ]
    new_args = ["convert", "--hf-path", str(SRC), "--target", "iphone12", "-o", str(out), "--force"]
    old, new = _references(tmp_path, out, old_args, new_args)
    assert not same_tree(old, new)
    kills_leave_old_or_new(tmp_path, out, new_args, old, new, seed=12)


def _references(tmp_path: Path, out: Path, old_args, new_args) -> tuple[Path, Path]:
    """The complete old and new outputs, each made at OUT (names inside depend on it)."""
    refs = tmp_path / "refs"
    refs.mkdir()
    run(*old_args, cwd=tmp_path)
    shutil.copytree(out, refs / "old")
    run(*new_args, cwd=tmp_path)
    shutil.copytree(out, refs / "new")
    return refs / "old", refs / "new"


def _restore(old: Path | None, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    if old is not None:
        shutil.copytree(old, out)
