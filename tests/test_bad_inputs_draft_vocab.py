"""Bad inputs of the shortlist draft head: `convert --draft-vocab N` outside 1..V-1 or without a
drafter, refused in one line before anything is written (in a bundle:
tests/test_bad_inputs_draft_vocab_bundle.py); a broken mtp/draft_vocab.json refused in one
line when the model loads. Rows run through the shared harness (tests/badinput.py) with
test_bad_inputs.py's built inputs (tiny_tied: 512 tokens)."""

from __future__ import annotations

import json

import pytest

from mlxkit import draft_vocab
from tests.badinput import api, cli, run_row, write_bytes
from tests.test_bad_inputs import _api_convert, built  # noqa: F401 (the module's fixture)

V = 512  # tiny_tied's vocabulary
GOOD = json.loads(draft_vocab.encode([1, 5, 9], V, "0" * draft_vocab.DIGEST_CHARS))


def vocab_file(**changes) -> object:
    """A setup: converted/mtp/draft_vocab.json, a valid one of 3 ids with `changes`."""
    return write_bytes(
        lambda i: i.converted / "mtp" / draft_vocab.FILE, json.dumps({**GOOD, **changes})
    )


def generate(*more: str) -> tuple[str, ...]:
    return ("generate", "--model", "{converted}", "--prompt", "hi", *more)


# fmt: off
ROWS = [
    cli("--draft-vocab 0", "convert", "--hf-path", "{src}", "-o", "{out}", "--draft-vocab", "0",
        message="draft vocabulary must be between 1 and 511 tokens"),
    cli("--draft-vocab the whole vocabulary", "convert", "--hf-path", "{src}", "-o", "{out}",
        "--draft-vocab", "512", message="leave --draft-vocab out for the full head"),
    cli("--draft-vocab with --no-mtp", "convert", "--hf-path", "{src}", "-o", "{out}",
        "--draft-vocab", "64", "--no-mtp", message="no drafter is written"),
    api("convert(draft_vocab='64')", lambda i: _api_convert(i, draft_vocab="64"),
        message="got '64'"),
    api("convert(draft_vocab=True)", lambda i: _api_convert(i, draft_vocab=True),
        message="got True"),
    cli("draft_vocab.json: not JSON", *generate(), needs=("converted",),
        setup=write_bytes(lambda i: i.converted / "mtp" / draft_vocab.FILE, "{ids"),
        message="not valid JSON"),
    cli("draft_vocab.json: another format", *generate(), needs=("converted",),
        setup=vocab_file(format="mlx"), message="not an mlxkit draft vocabulary"),
    cli("draft_vocab.json: a newer version", *generate(), needs=("converted",),
        setup=vocab_file(version=2), message="this mlxkit reads 1"),
    cli("draft_vocab.json: another vocabulary", *generate(), needs=("converted",),
        setup=vocab_file(vocab_size=248320), message="made for a 248320-token vocabulary"),
    cli("draft_vocab.json: ids not base64", *generate(), needs=("converted",),
        setup=vocab_file(ids="!!!!"), message="ids are not base64"),
    cli("draft_vocab.json: size mismatch", *generate(), needs=("converted",),
        setup=vocab_file(size=4), message="ids do not match its size 4"),
    cli("draft_vocab.json: ids out of order", *generate(), needs=("converted",),
        setup=vocab_file(ids="CQAAAAEAAAA=", size=2), message="ids must be ascending"),
    cli("draft_vocab.json: an id past the vocabulary", *generate(), needs=("converted",),
        setup=vocab_file(ids="AQAAAAACAAA=", size=2), message="below 512"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_draft_vocab_input(row, tmp_path, monkeypatch, built):  # noqa: F811
    run_row(row, tmp_path, monkeypatch, built)
