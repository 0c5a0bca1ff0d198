"""Bad inputs to `mlxkit eval` and `measure_quality`: each ends as one line and exit 2, leaves
nothing behind (the reference's temporary file included) and touches none of its inputs. The
harness is tests/badinput.py."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from mlxkit.micro import micro_dir
from mlxkit.quality import measure_quality
from tests.badinput import Inputs, api, cli, edit_json, fifo, run_row, write_bytes

CODE = "def f(x):\n    return x + 1\n\n\nprint(f(2))\n"
GOOD_TURN = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
}


def eval_cli(id: str, *args: str, **kw):
    """`mlxkit eval {src} --reference {src}` and `args`; the row's id names what is wrong."""
    return cli(f"eval: {id}", "eval", "{src}", "--reference", "{src}", *args, **kw)


def file(name: str, data: bytes | str):
    return write_bytes(lambda i: i.root / name, data)


def lines(name: str, *rows: object):
    """A .jsonl file of these rows (strings as they are, anything else as JSON)."""
    return file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def with_code(setup=None):
    """code.txt beside the inputs, then `setup`."""

    def both(i: Inputs) -> None:
        file("code.txt", CODE)(i)
        if setup is not None:
            setup(i)

    return both


def nan_embedding(i: Inputs) -> None:
    path = i.src / "model.safetensors"
    arrays, metadata = mx.load(str(path), return_metadata=True)
    name = "model.language_model.embed_tokens.weight"
    arrays[name] = arrays[name] * float("nan")
    mx.save_safetensors(str(path), arrays, metadata)


def micro_tokenizer(i: Inputs) -> None:
    shutil.copy(micro_dir() / "tokenizer.json", i.untied / "tokenizer.json")


def _measure(**kw):
    return lambda i: measure_quality(i.src, i.src, text=CODE, quiet=True, **kw)


# fmt: off
ROWS = [
    cli("eval: no --reference", "eval", "{src}", message="Missing option '--reference'"),
    cli("eval: missing model", "eval", "{root}/missing", "--reference", "{src}",
        message="missing: not a directory"),
    eval_cli("missing reference", "--reference", "{root}/missing",
             message="missing: not a directory"),
    eval_cli("--text missing", "--text", "{root}/missing.txt", message="not a file"),
    eval_cli("--text a directory", "--text", "{root}", message="not a file"),
    eval_cli("--text a FIFO", "--text", "{root}/pipe.txt", setup=fifo(lambda i: i.root / "pipe.txt"),
             subprocess=True, message="not a file"),
    eval_cli("--text not UTF-8", "--text", "{root}/bad.txt", setup=file("bad.txt", b"ok \xff\xfe"),
             message="not UTF-8 text (byte 3)"),
    eval_cli("--text empty", "--text", "{root}/empty.txt", setup=file("empty.txt", ""),
             message="fewer than 2 tokens"),
    eval_cli("--chat not JSON", "--chat", "{root}/c.jsonl", setup=lines("c.jsonl", "{oops"),
             message="line 1 is not JSON"),
    eval_cli("--chat a list", "--chat", "{root}/c.jsonl", setup=lines("c.jsonl", GOOD_TURN, [1]),
             message="conversation 2 is not"),
    eval_cli("--chat no role", "--chat", "{root}/c.jsonl",
             setup=lines("c.jsonl", {"messages": [{"content": "hi"}]}),
             message="conversation 1 is not"),
    eval_cli("--chat no messages", "--chat", "{root}/c.jsonl", setup=lines("c.jsonl", {"messages": []}),
             message="conversation 1 is not"),
    eval_cli("--chat empty", "--chat", "{root}/c.jsonl", setup=file("c.jsonl", "\n\n"),
             message="no conversations"),
    eval_cli("--chat tools not a list", "--chat", "{root}/c.jsonl",
             setup=lines("c.jsonl", {**GOOD_TURN, "tools": "all"}), message='"tools" that is not'),
    eval_cli("--chat the template refuses", "--chat", "{root}/c.jsonl",
             setup=lambda i: (lines("c.jsonl", GOOD_TURN)(i), (i.src / "chat_template.jinja")
                              .write_text("{{ raise_exception('this template refuses') }}")),
             message="this template refuses"),
    eval_cli("--window 1", "--window", "1", message="window must be an integer from 2 to 8192"),
    eval_cli("--window 10^6", "--window", "1000000", message="window must be an integer"),
    eval_cli("--window abc", "--window", "abc", message="Invalid value for '--window'"),
    eval_cli("--max-tokens 0", "--max-tokens", "0", message="max_tokens must be a positive"),
    eval_cli("--reference-dtype float16", "--reference-dtype", "float16",
             message="Invalid value for '--reference-dtype'"),
    eval_cli("--accumulation bfloat16", "--accumulation", "bfloat16",
             message="Invalid value for '--accumulation'"),
    eval_cli("--json in a missing folder", "--json", "{root}/nowhere/q.json",
             message="nowhere does not exist; create it first"),
    eval_cli("--json a directory", "--json", "{root}", message="is a directory"),
    cli("eval: another vocabulary", "eval", "{src}", "--reference", "{untied}",
        setup=edit_json(lambda i: i.src / "config.json",
                        lambda c: c["text_config"].update(vocab_size=1024)),
        needs=("src", "untied"), message="vocabulary of 1,024"),
    cli("eval: another tokenizer", "eval", "{src}", "--reference", "{untied}", "--text",
        "{root}/code.txt", setup=with_code(micro_tokenizer), needs=("src", "untied"),
        message="tokenizes the evaluation text (text) differently"),
    cli("eval: a reference with NaN weights", "eval", "{untied}", "--reference", "{src}", "--text",
        "{root}/code.txt", setup=with_code(nan_embedding), needs=("src", "untied"),
        message="the reference produced non-finite logits"),
    api("measure_quality: window a string", _measure(window="64"), message="window must be"),
    api("measure_quality: window True", _measure(window=True), message="got True"),
    api("measure_quality: max_tokens 1.5", _measure(max_tokens=1.5), message="max_tokens must"),
    api("measure_quality: reference_dtype float16", _measure(reference_dtype="float16"),
        message="reference_dtype must be one of float32, bfloat16"),
    api("measure_quality: accumulation bfloat16", _measure(accumulation="bfloat16"),
        message="accumulation must be one of float32, native"),
    api("measure_quality: text bytes",
        lambda i: measure_quality(i.src, i.src, text=b"abc"), message="text must be a string"),
    api("measure_quality: chat a string",
        lambda i: measure_quality(i.src, i.src, chat="hi"), message="chat must be a list"),
    api("measure_quality: chat empty",
        lambda i: measure_quality(i.src, i.src, chat=[]), message="no conversations"),
    api("measure_quality: chat messages a string",
        lambda i: measure_quality(i.src, i.src, chat=[{"messages": "hi"}]),
        message="conversation 1 is not"),
    api("measure_quality: tmp_dir missing", _measure(tmp_dir="missing"),
        message="missing: not a directory; pass an existing folder"),
    api("measure_quality: reference_dtype a list", _measure(reference_dtype=["float32"]),
        message="got a list of 1"),
    api("measure_quality: tmp_dir a number", _measure(tmp_dir=3), message="tmp_dir"),
    eval_cli("--text a NUL byte", "--text", "a\0b", message="not a usable path"),
    api("measure_quality: micro against tiny",
        lambda i: measure_quality("micro", i.src, text=CODE), message="vocabulary of 2,112"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path, monkeypatch):
    run_row(row, tmp_path, monkeypatch, built={})
