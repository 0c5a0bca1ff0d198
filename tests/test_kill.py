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
ATTEMPTS = 40
SRC = FIXTURES / "tiny_untied"


def mlxkit(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mlxkit", *args, "--quiet"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


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


def kill_at_random(args: list[str], cwd: Path, out: Path, rng: random.Random,
                   writing_s: float) -> tuple[str, bool]:  # fmt: skip
    """Starts the command and kills it with SIGKILL: half the time at a random moment of the
    whole run, half the time at a random moment after its temporary folder appears (when it
    is writing or swapping). Returns when (for failure messages) and whether it was still
    running."""
    proc = mlxkit(*args, cwd=cwd)
    t0 = time.monotonic()
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0, 3 * writing_s))
    else:
        while proc.poll() is None and not temporaries(out.parent, out):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, writing_s))
    when = f"{time.monotonic() - t0:.3f} s"
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return when, proc.returncode == -signal.SIGKILL


def writing_time(args: list[str], cwd: Path, out: Path) -> float:
    """Seconds from the temporary folder's appearance to the end of a run."""
    proc = mlxkit(*args, cwd=cwd)
    while proc.poll() is None and not temporaries(out.parent, out):
        time.sleep(0.002)
    t0 = time.monotonic()
    proc.wait()
    return max(0.05, time.monotonic() - t0)


def test_kill_during_convert_leaves_no_output_or_the_new_one(tmp_path):
    out = tmp_path / "out"
    args = ["convert", "--hf-path", str(SRC), "-o", str(out)]
    run(*args, cwd=tmp_path)
    reference = tmp_path / "reference"
    out.rename(reference)
    writing_s = writing_time(args, tmp_path, out)
    shutil.rmtree(out)
    rng, kills, left = random.Random(10), 0, 0
    for i in range(ATTEMPTS):
        if kills == KILLS:
            break
        when, killed = kill_at_random(args, tmp_path, out, rng, writing_s)
        kills += killed
        left += bool(temporaries(out.parent, out))  # what the next run must clean up
        assert not out.exists() or same_tree(out, reference), f"kill {i} at {when}"
        run(*args, "--force", cwd=tmp_path)
        assert same_tree(out, reference), f"rerun after kill {i} at {when}"
        assert temporaries(tmp_path, out) == [], f"kill {i} at {when}"
        shutil.rmtree(out)
    print(f"{kills} kills in {i + 1} runs; {left} left a temporary folder for the next run")
    assert kills == KILLS and left > 0  # the cleanup was put to the test


def test_kill_during_convert_force_leaves_the_old_output_or_the_new_one(tmp_path):
    out = tmp_path / "out"
    old_args = ["convert", "--hf-path", str(SRC), "-o", str(out), "--bits", "8"]
    new_args = ["convert", "--hf-path", str(SRC), "-o", str(out), "--force"]
    old, new = _references(tmp_path, out, old_args, new_args)
    writing_s = writing_time(new_args, tmp_path, out)
    rng, kills, left = random.Random(11), 0, 0
    for i in range(ATTEMPTS):
        if kills == KILLS:
            break
        _restore(old, out)
        when, killed = kill_at_random(new_args, tmp_path, out, rng, writing_s)
        kills += killed
        left += bool(temporaries(out.parent, out))  # what the next run must clean up
        assert same_tree(out, old) or same_tree(out, new), f"kill {i} at {when}"
        run(*new_args, cwd=tmp_path)
        assert same_tree(out, new) and temporaries(tmp_path, out) == [], f"kill {i} at {when}"
    print(f"{kills} kills in {i + 1} runs; {left} left a temporary folder for the next run")
    assert kills == KILLS and left > 0  # the cleanup was put to the test


def test_kill_during_convert_target_force_over_a_bundle(tmp_path):
    out = tmp_path / "bundle"
    old_args = ["convert", "--hf-path", str(SRC), "--target", "iphone12", "-o", str(out),
                "--recipe", "uniform", "--bits", "8"]  # fmt: skip
    new_args = ["convert", "--hf-path", str(SRC), "--target", "iphone12", "-o", str(out),
                "--force"]  # fmt: skip
    old, new = _references(tmp_path, out, old_args, new_args)
    assert not same_tree(old, new)
    writing_s = writing_time(new_args, tmp_path, out)
    rng, kills, left = random.Random(12), 0, 0
    for i in range(ATTEMPTS):
        if kills == KILLS:
            break
        _restore(old, out)
        when, killed = kill_at_random(new_args, tmp_path, out, rng, writing_s)
        kills += killed
        left += bool(temporaries(out.parent, out))  # what the next run must clean up
        assert same_tree(out, old) or same_tree(out, new), f"kill {i} at {when}"
        run(*new_args, cwd=tmp_path)
        assert same_tree(out, new) and temporaries(tmp_path, out) == [], f"kill {i} at {when}"
    print(f"{kills} kills in {i + 1} runs; {left} left a temporary folder for the next run")
    assert kills == KILLS and left > 0  # the cleanup was put to the test


def _references(tmp_path: Path, out: Path, old_args, new_args) -> tuple[Path, Path]:
    """The complete old and new outputs, each made at OUT (names inside depend on it)."""
    refs = tmp_path / "refs"
    refs.mkdir()
    run(*old_args, cwd=tmp_path)
    shutil.copytree(out, refs / "old")
    run(*new_args, cwd=tmp_path)
    shutil.copytree(out, refs / "new")
    return refs / "old", refs / "new"


def _restore(old: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(old, out)
