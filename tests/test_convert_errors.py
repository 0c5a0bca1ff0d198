"""Every bad input: exit code 2, one line on stderr, no traceback, and nothing left on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlxkit.convert import convert
from mlxkit.convert import writer as writer_module

from mlxkit.cli import main
from tests.helpers import FIXTURES


def copy_fixture(tmp_path: Path, name: str = "tiny_tied") -> Path:
    dst = tmp_path / "src"
    shutil.copytree(FIXTURES / name, dst)
    return dst


def edit_weights(src: Path, edit) -> None:
    path = src / "model.safetensors"
    weights = mx.load(str(path))
    edit(weights)
    mx.save_safetensors(str(path), weights)


def edit_config(src: Path, edit) -> None:
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))


def truncate(src: Path) -> None:
    path = src / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def header_claims_more(src: Path) -> None:
    """The 8-byte header length says the JSON header runs past the end of the file."""
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) + 1000).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def tensor_past_the_end(src: Path) -> None:
    """A header whose last tensor claims bytes the file does not have."""
    path = src / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, start + 2 * (end - start)]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


Case = namedtuple("Case", "break_source args message")
EMBED = "model.language_model.embed_tokens.weight"
CASES = {
    "missing config.json": Case(lambda s: (s / "config.json").unlink(), [], "no config.json"),
    "unsupported model_type": Case(
        lambda s: edit_config(s, lambda c: c.update(model_type="llama")), [], "'llama'"
    ),
    "missing tensor": Case(
        lambda s: edit_weights(
            s, lambda w: w.pop("model.language_model.layers.1.mlp.up_proj.weight")
        ),
        [],
        "missing tensor for language_model.model.layers.1.mlp.up_proj.weight",
    ),
    "missing mtp tensor": Case(
        lambda s: edit_weights(s, lambda w: w.pop("mtp.fc.weight")), [], "mtp.fc.weight"
    ),
    "shape mismatch": Case(
        lambda s: edit_weights(s, lambda w: w.update({EMBED: w[EMBED][:, :32]})),
        [],
        "has shape (512, 32), expected (512, 64)",
    ),
    "unknown tensor": Case(
        lambda s: edit_weights(s, lambda w: w.update({"model.language_model.extra": mx.zeros(2)})),
        [],
        "model.language_model.extra is not a Qwen 3.5 text-model tensor",
    ),
    "quantized source": Case(
        lambda s: edit_weights(s, lambda w: w.update({EMBED: w[EMBED].view(mx.uint16)})),
        [],
        "expected bf16, f16 or f32",
    ),
    "truncated shard": Case(truncate, [], "truncated"),
    "header claims more than the file": Case(header_claims_more, [], "exceeds the file"),
    "tensor past the end of the file": Case(tensor_past_the_end, [], "truncated download"),
    "--bits 7": Case(None, ["--bits", "7"], "bits must be one of 2, 3, 4, 5, 6, 8, got 7"),
    "--group-size 48": Case(None, ["--group-size", "48"], "group size must be one of"),
    "unknown recipe": Case(None, ["--recipe", "fast"], "unknown recipe 'fast'"),
    "--dtype int8": Case(None, ["--dtype", "int8"], "dtype must be one of"),
    "--bits with --no-quantize": Case(None, ["--no-quantize", "--bits", "8"], "no effect"),
}


def run_cli(args: list[str]):
    result = CliRunner().invoke(main, ["convert", *args])
    return result


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in result.output


def assert_nothing_left(parent: Path, keep: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == keep


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, case):
    spec = CASES[case]
    src = copy_fixture(tmp_path)
    if spec.break_source is not None:
        spec.break_source(src)
    out = tmp_path / "out"
    result = run_cli(["--hf-path", str(src), "-o", str(out), *spec.args])
    assert_one_line_error(result, spec.message)
    assert_nothing_left(tmp_path, {"src"})


def test_unknown_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli(["--size", "3b"]), "unknown size '3b'; choose one of 0.8b")
    assert_nothing_left(tmp_path, set())


@pytest.mark.parametrize("args", [[], ["--hf-path", "x", "--size", "2b"]])
def test_exactly_one_source(args):
    assert_one_line_error(run_cli(args), "exactly one of --hf-path DIR or --size SIZE")


def test_hf_path_must_be_a_directory(tmp_path):
    assert_one_line_error(run_cli(["--hf-path", str(tmp_path / "nope")]), "not a directory")


def test_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    assert convert(FIXTURES / "tiny_tied", out, quiet=True).output == out
    result = run_cli(["--hf-path", str(FIXTURES / "tiny_tied"), "-o", str(out), "--bits", "8"])
    assert_one_line_error(result, "already exists; pass --force")
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    result = run_cli(
        [
            "--hf-path",
            str(FIXTURES / "tiny_tied"),
            "-o",
            str(out),
            "--force",
            "--quiet",
            "--bits",
            "8",
        ]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert_nothing_left(tmp_path, {"out"})


@pytest.mark.parametrize("user_file", ["keep.txt", "mtp/notes.md"])
def test_force_never_replaces_a_folder_holding_files_mlxkit_did_not_write(tmp_path, user_file):
    out = tmp_path / "out"
    convert(FIXTURES / "tiny_tied", out, quiet=True)
    (out / user_file).write_text("mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = run_cli(["--hf-path", str(FIXTURES / "tiny_tied"), "-o", str(out), "--force"])
    assert_one_line_error(result, "was not written by mlxkit")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / user_file).read_text() == "mine"
    assert_nothing_left(tmp_path, {"out"})


def test_size_checks_options_and_output_before_downloading(tmp_path, monkeypatch):
    from mlxkit import source

    monkeypatch.setattr(source, "download", lambda repo: pytest.fail("downloaded"))
    (tmp_path / "out").mkdir()
    assert_one_line_error(run_cli(["--size", "2b", "-o", str(tmp_path / "out")]), "already exists")
    assert_one_line_error(run_cli(["--size", "2b", "--bits", "7"]), "bits must be one of")


def test_missing_parent_directories_are_made_and_cleaned_up(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    assert convert(FIXTURES / "tiny_tied", out, quiet=True).output == out
    monkeypatch.setattr(
        writer_module.ShardedWriter, "close", lambda self: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        convert(FIXTURES / "tiny_tied", tmp_path / "x" / "y" / "out", quiet=True)
    assert_nothing_left(tmp_path, {"a"})


def test_output_never_replaces_the_source(tmp_path):
    src = copy_fixture(tmp_path)
    result = run_cli(["--hf-path", str(src), "-o", str(src), "--force"])
    assert_one_line_error(result, "would replace the source")
    assert (src / "model.safetensors").is_file()


def test_not_enough_disk(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=100_000))
    result = run_cli(["--hf-path", str(FIXTURES / "tiny_tied"), "-o", str(tmp_path / "out")])
    assert_one_line_error(result, "not enough disk space")
    assert_nothing_left(tmp_path, set())


def test_disk_full_while_writing(tmp_path, monkeypatch):
    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module.os, "pwrite", full)
    result = run_cli(["--hf-path", str(FIXTURES / "tiny_tied"), "-o", str(tmp_path / "out")])
    assert_one_line_error(result, "disk full")
    assert_nothing_left(tmp_path, set())


def test_interrupt_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real_write = writer_module.ShardedWriter.write

    def interrupt(self, *args):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real_write(self, *args)

    monkeypatch.setattr(writer_module.ShardedWriter, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(FIXTURES / "tiny_untied", tmp_path / "out", quiet=True)
    assert_nothing_left(tmp_path, set())


def test_interrupt_with_force_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(FIXTURES / "tiny_tied", out, quiet=True)
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(
        writer_module.ShardedWriter, "close", lambda self: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        convert(FIXTURES / "tiny_tied", out, quiet=True, force=True, bits=8)
    assert (out / "model.safetensors").read_bytes() == before
    assert_nothing_left(tmp_path, {"out"})


def test_offline_size_says_to_pass_hf_path(tmp_path):
    """No network here: with HF_HUB_OFFLINE=1 and an empty cache, --size fails cleanly (a
    real subprocess, so that huggingface_hub reads the environment at import)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "mlxkit", "convert", "--size", "0.8b", "-o", str(tmp_path / "o")],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "Qwen/Qwen3.5-0.8B" in lines[0] and "--hf-path DIR" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", [[], ["--target", "iphone12"]], ids=["plain", "--target"])
@pytest.mark.parametrize("where", ["source", "parent of source", "cwd"])
def test_serious_finding_1_force_never_deletes_the_source_or_the_current_directory(
    tmp_path, monkeypatch, target, where
):
    """Issue 10, finding 1: `convert --target PHONE -o DIR --force` deleted the source
    checkpoint (and the files beside it) when DIR was the source or held it, and
    `convert --size micro -o . --force` wiped the current directory."""
    src = copy_fixture(tmp_path)
    (tmp_path / "beside.txt").write_text("mine")
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    out = {"source": str(src), "parent of source": str(tmp_path), "cwd": "."}[where]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = run_cli(["--hf-path", str(src), "-o", out, "--force", *target])
    assert_one_line_error(result, "current directory" if where == "cwd" else "replace the source")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    result = run_cli(["--size", "micro", "-o", ".", "--force", *target])
    assert_one_line_error(result, "the current directory")
    assert (cwd / "notes.txt").read_text() == "mine"
