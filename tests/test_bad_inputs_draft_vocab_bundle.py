"""Bad inputs of a bundle's draft vocabulary (`mlxkit plan` / `convert --target` / `bundle build`
with `--draft-vocab N`, the planner's knob): N outside 1..V-1, with --no-mtp, with an
mlx-swift-lm that has no drafter, or not a whole number, refused in one line before anything
is written; and `bundle verify` failing a manifest whose `mtp.draft_vocab` the bundle does not
bear out (exit 1). Rows run through the shared harness (tests/badinput.py) with
test_bad_inputs.py's row makers and built inputs (tiny_tied: 512 tokens)."""

from __future__ import annotations

import pytest

from mlxkit import draft_vocab
from tests.badinput import api, run_row, write_bytes
from tests.test_bad_inputs import (  # noqa: F401 (built: the module's fixture)
    _api_build,
    build,
    built,
    edit_manifest,
    plan,
    to_bundle,
    verify,
)

RANGE = "draft vocabulary must be between 1 and 511 tokens"
NO_DRAFTER = "no drafter is written (--no-mtp, or the checkpoint has no MTP head)"
PLAN = ("--model", "{src}", "--target", "iphone12")
FILE = f"mtp/{draft_vocab.FILE}"


def _api_plan(**kw):
    from mlxkit.ios_bridge import plan as make_plan

    from tests.helpers import FIXTURES

    return make_plan(FIXTURES / "tiny_tied", "iphone12", **kw)


def mtp_says(value: object):
    """A setup: the bundle's manifest with mtp.draft_vocab `value`."""
    return edit_manifest(lambda m: m["mtp"].update(draft_vocab=value))


# fmt: off
ROWS = [
    to_bundle("convert --target --draft-vocab 0", "--draft-vocab", "0", message=RANGE),
    to_bundle("convert --target --draft-vocab with --no-mtp", "--draft-vocab", "64", "--no-mtp",
              message=NO_DRAFTER),
    build("bundle build --draft-vocab 512 (the whole head)", "--draft-vocab", "512",
          message="leave --draft-vocab out for the full head"),
    build("bundle build --draft-vocab -5", "--draft-vocab", "-5", message="got -5"),
    build("bundle build --draft-vocab with --no-mtp", "--draft-vocab", "64", "--no-mtp",
          message=NO_DRAFTER),
    build("bundle build --draft-vocab with --swift-runtime 3.31.4", "--draft-vocab", "64",
          "--swift-runtime", "3.31.4", message="mlx-swift-lm 3.31.4 has no Qwen 3.5 MTP drafter"),
    plan("plan --draft-vocab 100000", *PLAN, "--draft-vocab", "100000", message="got 100000"),
    plan("plan --draft-vocab with --no-mtp", *PLAN, "--draft-vocab", "64", "--no-mtp",
         message=NO_DRAFTER),
    api("build_bundle(draft_vocab='64')", lambda i: _api_build(i, draft_vocab="64"),
        message="got '64'"),
    api("build_bundle(draft_vocab=True)", lambda i: _api_build(i, draft_vocab=True),
        message="got True"),
    api("plan(draft_vocab=512)", lambda i: _api_plan(draft_vocab=512), message=RANGE),
    api("plan(draft_vocab=64, mtp=False)", lambda i: _api_plan(draft_vocab=64, mtp=False),
        message=NO_DRAFTER),
    verify("verify: mtp.draft_vocab 64 without the file", mtp_says(64),
           f"{FILE} is missing; the manifest gives the drafter 64 tokens"),
    verify("verify: mtp.draft_vocab true", mtp_says(True), "got True"),
    verify("verify: mtp.draft_vocab left out", edit_manifest(lambda m: m["mtp"].pop("draft_vocab")),
           "mtp.draft_vocab: missing"),
    verify("verify: a draft vocabulary the manifest does not give",
           write_bytes(lambda i: i.bundle / FILE,
                       draft_vocab.encode([1, 5, 9], 512, "0" * draft_vocab.DIGEST_CHARS)),
           f"{FILE} is there, but the manifest gives the drafter none"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_draft_vocab_bundle_input(row, tmp_path, monkeypatch, built):  # noqa: F811
    run_row(row, tmp_path, monkeypatch, built)
