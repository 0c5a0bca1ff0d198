"""The bad-input harness: one `Row` per bad input, each run the same way and held to the
same promise — exit code 2 (1 for a bundle that `bundle verify` fails), exactly one line on
stderr, no traceback, nothing new on disk beside the inputs, and the inputs untouched. An
API row must raise an MlxkitError with a one-line message, and leave the disk as it was.

To add a case, append a row to a table in tests/test_bad_inputs.py (or any test module):
`cli(id, *args, setup=..., message=...)` or `api(id, call, setup=..., message=...)`, then
`run_row(row, tmp_path, monkeypatch)`. Inputs are fresh copies per row, laid out in
`Inputs` (the row's current directory); `setup` breaks them before the run. Rows that could
hang if the code regressed (FIFOs, runaway chat templates) set `subprocess=True`: a CLI row
then runs `python -m mlxkit`, an API row a forked child, under a timeout instead of
in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxkit.cli import main
from mlxkit.errors import MlxkitError
from tests.helpers import FIXTURES

TIMEOUT_S = 120


@dataclass
class Inputs:
    """A row's folder (its current directory) and the inputs copied into it."""

    root: Path

    @property
    def src(self) -> Path:  # the tiny_tied checkpoint (Hugging Face layout, one shard)
        return self.root / "src"

    @property
    def untied(self) -> Path:  # tiny_untied: two shards and an index
        return self.root / "untied"

    @property
    def vision(self) -> Path:  # tiny_vision_p4 (Hugging Face layout, image0.png, image1.png)
        return self.root / "vision"

    @property
    def converted(self) -> Path:  # tiny_tied converted to 4-bit, with mtp/
        return self.root / "converted"

    @property
    def bundle(self) -> Path:  # tiny_tied bundled for the iPhone 12
        return self.root / "bundle"

    @property
    def out(self) -> Path:  # where outputs are asked for; must never appear
        return self.root / "out"

    def format(self, arg: str) -> str:
        return arg.format(
            root=self.root,
            src=self.src,
            untied=self.untied,
            vision=self.vision,
            converted=self.converted,
            bundle=self.bundle,
            out=self.out,
        )


@dataclass(frozen=True)
class Row:
    id: str
    args: tuple[str, ...] = ()  # CLI arguments; "{src}", "{out}", ... name the inputs
    call: Callable[[Inputs], object] | None = None  # an API call instead of the CLI
    setup: Callable[[Inputs], None] | None = None
    message: str = ""  # a substring of the one-line error
    code: int = 2
    needs: tuple[str, ...] = ("src",)
    subprocess: bool = False
    env: dict[str, str] = field(default_factory=dict)  # values formatted like args
    cwd: str = "{root}"  # the current directory for the run (made if missing)


def cli(id: str, *args: str, **kw) -> Row:
    return Row(id, tuple(args), **kw)


def api(id: str, call: Callable[[Inputs], object], **kw) -> Row:
    return Row(id, call=call, **kw)


# --- prepared inputs ---------------------------------------------------------------------------

_SOURCES = {
    "src": FIXTURES / "tiny_tied",
    "untied": FIXTURES / "tiny_untied",
    "vision": FIXTURES / "tiny_vision_p4",
}


def prepare(inputs: Inputs, needs: tuple[str, ...], built: dict[str, Path]) -> None:
    for name in needs:
        origin = built[name] if name in built else _SOURCES[name]
        shutil.copytree(
            origin,
            inputs.root / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("reference.npz"),
        )


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, by relative path: kind and content (never following a
    symlink, never opening anything but a regular file)."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha1(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            else:
                out[rel] = (stat.S_IFMT(st.st_mode),)
    return out


def _guard_rmtree(monkeypatch, allowed: Path) -> None:
    """No row may delete anything outside its own folder, whatever the code under test
    does: shutil.rmtree refuses."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(allowed)):
            raise AssertionError(f"rmtree({path}) outside the test folder")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)


# --- running a row -----------------------------------------------------------------------------


def run_row(row: Row, tmp_path: Path, monkeypatch, built: dict[str, Path]) -> None:
    inputs = Inputs(tmp_path / "in")
    inputs.root.mkdir()
    prepare(inputs, row.needs, built)
    if row.setup is not None:
        row.setup(inputs)
    cwd = Path(inputs.format(row.cwd))
    cwd.mkdir(parents=True, exist_ok=True)
    before = snapshot(tmp_path)
    monkeypatch.chdir(cwd)
    _guard_rmtree(monkeypatch, tmp_path)
    env = {k: inputs.format(v) for k, v in row.env.items()}
    if row.call is not None:
        _run_api(row, inputs)
    elif row.subprocess:
        _run_subprocess(row, inputs, env)
    else:
        _run_in_process(row, inputs, env)
    after = snapshot(tmp_path)
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (new or gone or changed), f"left {new}, removed {gone}, changed {changed}"


def _check_output(row: Row, code: int, stdout: str, stderr: str, detail: str) -> None:
    assert code == row.code, f"exit {code}, wanted {row.code}: {stderr or stdout}{detail}"
    assert "Traceback" not in stdout + stderr, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr has {len(lines)} lines: {stderr!r}"
    lead = "bundle FAILED" if row.code == 1 else "error: "
    assert lines[0].startswith(lead), lines[0]
    assert row.message in (stdout + lines[0] if row.code == 1 else lines[0]), (
        f"{row.message!r} not in {lines[0]!r}" + (f" / {stdout!r}" if row.code == 1 else "")
    )


def _run_in_process(row: Row, inputs: Inputs, env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, [inputs.format(a) for a in row.args], env=env)
    detail = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        detail = "\n" + "".join(traceback.format_exception(*result.exc_info))
    _check_output(row, result.exit_code, result.stdout, result.stderr, detail)


def _run_subprocess(row: Row, inputs: Inputs, env: dict[str, str]) -> None:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "mlxkit", *(inputs.format(a) for a in row.args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=Path.cwd(),
        check=False,
        env={**os.environ, "PYTHONPATH": str(root), **env},
    )
    _check_output(row, proc.returncode, proc.stdout, proc.stderr, "")


def _run_api(row: Row, inputs: Inputs) -> None:
    if row.subprocess:
        message = _call_in_child(row, inputs)
    else:
        with pytest.raises(MlxkitError) as caught:
            row.call(inputs)
        message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert row.message in message, f"{row.message!r} not in {message!r}"


def _call_in_child(row: Row, inputs: Inputs) -> str:
    """An API row run in a forked child under the timeout: the MlxkitError's message, or a
    failure saying what the child did instead (a hang is killed)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            row.call(inputs)
            send.send(("returned", "DID NOT RAISE MlxkitError"))
        except MlxkitError as e:
            send.send(("raised", str(e)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent as the failure
            send.send(("crashed", "".join(traceback.format_exception(e))))

    process = ctx.Process(target=child)
    process.start()
    if not receive.poll(TIMEOUT_S):
        process.kill()
        process.join()
        pytest.fail(f"the call hung (killed after {TIMEOUT_S} s)")
    how, text = receive.recv()
    process.join()
    if how != "raised":
        pytest.fail(text)
    return text


# --- ways to break inputs ----------------------------------------------------------------------


def edit_json(path_of: Callable[[Inputs], Path], edit: Callable[[dict], object]) -> Callable:
    """A setup that edits a JSON file in place (`edit` mutates it; what it returns is
    ignored)."""

    def setup(inputs: Inputs) -> None:
        path = path_of(inputs)
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return setup


def write_bytes(path_of: Callable[[Inputs], Path], data: bytes | str) -> Callable:
    def setup(inputs: Inputs) -> None:
        path = path_of(inputs)
        path.unlink(missing_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def safetensors_bytes(header: object, data: bytes, raw: bytes | None = None) -> bytes:
    """A safetensors file: 8-byte length, the header (JSON of `header`, or `raw`), data."""
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def edit_header(
    path_of: Callable[[Inputs], Path], edit: Callable[[dict, bytes], object]
) -> Callable:
    """A setup that rewrites a shard's header; `edit(header, data)` changes the header in
    place, or returns (header, data) or raw header bytes to write instead."""

    def setup(inputs: Inputs) -> None:
        path = path_of(inputs)
        header, data = read_safetensors(path)
        replaced = edit(header, data)
        if isinstance(replaced, bytes):
            path.write_bytes(safetensors_bytes(None, data, raw=replaced))
        elif isinstance(replaced, tuple):
            path.write_bytes(safetensors_bytes(*replaced))
        else:
            path.write_bytes(safetensors_bytes(header, data))

    return setup


def fifo(path_of: Callable[[Inputs], Path]) -> Callable:
    def setup(inputs: Inputs) -> None:
        path = path_of(inputs)
        path.unlink(missing_ok=True)
        os.mkfifo(path)

    return setup


def symlink_loop(path_of: Callable[[Inputs], Path]) -> Callable:
    def setup(inputs: Inputs) -> None:
        path = path_of(inputs)
        path.unlink(missing_ok=True)
        other = path.with_name(path.name + ".other")
        path.symlink_to(other.name)
        other.symlink_to(path.name)

    return setup


def steps(*setups: Callable) -> Callable:
    def setup(inputs: Inputs) -> None:
        for s in setups:
            s(inputs)

    return setup
