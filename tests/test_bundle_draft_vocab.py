"""A bundle with a draft vocabulary (`convert --target ... --draft-vocab N`, issue 24 item 2):
the planner counts mtp/draft_vocab.json's bytes in the drafter's part, the bundle carries the
file (listed and hashed, `mtp.draft_vocab` N in the manifest), `bundle verify` holds it to the
manifest and the plan and re-derives it from the recorded source, and `mlxkit.load` of the
bundle drafts over it with the same greedy tokens as plain decoding (float32). MLX Swift's
drafter ignores the file (tests/swift_loading.py), which the bundle's README says."""

from __future__ import annotations

import json
import plistlib
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlxkit.convert.shortlist import calibration_ids, rank
from mlxkit.ios_bridge import build_bundle, plan, verify_bundle
from mlxkit.ios_bridge.manifest import sha256_file

from mlxkit import draft_vocab
from mlxkit.cli import main
from mlxkit.generate import stream_generate
from mlxkit.load import load
from tests.helpers import FIXTURES
from tests.swift_loading import drafter_files_read
from tests.test_draft_vocab import _recording_greedy_accept
from tests.test_generate import PROMPTS

SRC = FIXTURES / "tiny_tied"
N = 64  # of tiny_tied's 512 tokens
FILE = f"mtp/{draft_vocab.FILE}"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """tiny_tied for the iPhone 12 in float32: with a 64-token draft vocabulary (through
    `mlxkit convert --target`, which refused --draft-vocab before) and without."""
    root = tmp_path_factory.mktemp("draft-vocab-bundle")
    args = ["convert", "--hf-path", str(SRC), "-o", str(root / "with"), "--target", "iphone12"]
    result = CliRunner().invoke(main, [*args, "--dtype", "float32", "--draft-vocab", str(N)])
    assert result.exit_code == 0, result.output
    assert f"a {N}-token draft vocabulary for mlxkit's loop" in result.output
    build_bundle(SRC, root / "without", "iphone12", dtype="float32")
    return {"with": root / "with", "without": root / "without"}


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if not c.ok}


def test_the_plan_counts_the_files_real_size(bundles):
    size = (bundles["with"] / FILE).stat().st_size
    assert size == draft_vocab.file_bytes(512, N)
    planned = plan(SRC, "iphone12", dtype="float32", draft_vocab=N)
    plain = plan(SRC, "iphone12", dtype="float32")
    assert planned.weights["mtp"] - plain.weights["mtp"] == size
    assert planned.total - plain.total == size
    assert planned.weight_reads == plain.weight_reads  # a draft step does not read the file
    m, m0 = manifest(bundles["with"]), manifest(bundles["without"])
    assert m["memory"]["weights_by_part"]["mtp"] - m0["memory"]["weights_by_part"]["mtp"] == size
    assert m["memory"]["peak_bytes"] - m0["memory"]["peak_bytes"] == size
    # `mlxkit plan` shares the knob and makes the bundle's plan (choose_plan's recipe)
    args = ["plan", "--model", str(SRC), "--target", "iphone12", "--dtype", "float32"]
    shown = CliRunner().invoke(main, [*args, "--draft-vocab", str(N), "--json"])
    assert shown.exit_code == 0, shown.output
    planned_json = json.loads(shown.output)
    assert planned_json["memory"]["weights_by_part"] == m["memory"]["weights_by_part"]
    assert planned_json["mtp"]["draft_vocab"] == N
    text = CliRunner().invoke(main, [*args, "--draft-vocab", str(N)]).output
    assert f"drafting over {N} tokens in mlxkit's loop (mtp/draft_vocab.json" in text


def test_the_bundle_carries_the_shortlist(bundles):
    bundle, m = bundles["with"], manifest(bundles["with"])
    assert (
        m["mtp"]["draft_vocab"] == N and manifest(bundles["without"])["mtp"]["draft_vocab"] is None
    )
    assert not (bundles["without"] / FILE).exists()
    entry = next(f for f in m["files"] if f["path"] == FILE)
    assert entry == {
        "path": FILE,
        "bytes": (bundle / FILE).stat().st_size,
        "sha256": sha256_file(bundle / FILE),
    }
    ids = draft_vocab.read(bundle / FILE, 512)
    assert ids.tolist() == sorted(rank(calibration_ids(SRC), 512)[:N].tolist())
    # the app downloads it with mtp/; mlx-swift-lm's drafter loader never opens it
    sizes = [
        plistlib.loads((b / "xcode" / "Info-BackgroundAssets.plist").read_bytes())[
            "BAMaxInstallSize"
        ]
        for b in (bundle, bundles["without"])
    ]
    assert sizes[0] - sizes[1] == entry["bytes"]
    assert draft_vocab.FILE not in drafter_files_read(bundle / "mtp")
    readme = (bundle / "xcode" / "README.md").read_text()
    assert "**the phone's drafter ignores it and\ndrafts over the whole output head**" in readme
    assert "`mlxkit.load` of this\nbundle on a Mac drafts over those tokens only" in readme
    assert draft_vocab.FILE not in (bundles["without"] / "xcode" / "README.md").read_text()


def test_the_bundle_verifies_and_re_derives_the_shortlist(bundles):
    report = verify_bundle(bundles["with"])
    assert report.ok, failed(report)
    detail = next(c.detail for c in report.checks if c.name == "draft vocabulary")
    assert detail == (
        f"{FILE}: {N} of 512 tokens, {draft_vocab.file_bytes(512, N)} bytes as planned; "
        "re-derived from the recorded source's calibration set"
    )


def _relist(bundle: Path, m: dict) -> None:
    """Rewrites the manifest with the files' entries made to match the disk again."""
    m["files"] = [
        {
            **f,
            "bytes": (bundle / f["path"]).stat().st_size,
            "sha256": sha256_file(bundle / f["path"]),
        }
        for f in m["files"]
        if (bundle / f["path"]).is_file()
    ]
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def test_verify_fails_another_shortlist_a_missing_one_and_an_unannounced_one(bundles, tmp_path):
    other = Path(shutil.copytree(bundles["with"], tmp_path / "other"))
    (other / FILE).write_bytes(draft_vocab.encode(range(N), 512, "0" * draft_vocab.DIGEST_CHARS))
    _relist(other, manifest(other))
    assert failed(verify_bundle(other, load=False)) == {
        "draft vocabulary": f"{FILE} is not the shortlist the recorded source's calibration set gives"
    }
    missing = Path(shutil.copytree(bundles["with"], tmp_path / "missing"))
    (missing / FILE).unlink()
    _relist(missing, manifest(missing))
    assert failed(verify_bundle(missing, load=False)) == {
        "draft vocabulary": f"{FILE} is missing; the manifest gives the drafter {N} tokens"
    }
    unannounced = Path(shutil.copytree(bundles["with"], tmp_path / "unannounced"))
    m = manifest(unannounced)
    m["mtp"]["draft_vocab"] = None
    _relist(unannounced, m)
    problems = failed(verify_bundle(unannounced, load=False))
    assert (
        problems["draft vocabulary"] == f"{FILE} is there, but the manifest gives the drafter none"
    )
    assert "memory.weights_by_part.mtp" in problems["manifest matches a re-plan"]


def test_mlxkit_loads_the_bundle_drafting_over_the_shortlist(bundles, monkeypatch):
    """float32: k = 1, 2 and auto give plain decoding's greedy tokens, every draft from the
    shortlist."""
    model, tokenizer = load(bundles["with"])
    ids = draft_vocab.read(bundles["with"] / FILE, 512)
    assert model.draft_head is not None and model.draft_head.ids.tolist() == ids.tolist()
    assert load(bundles["without"])[0].draft_head is None
    rounds = _recording_greedy_accept(monkeypatch)
    for prompt in PROMPTS[:1]:
        plain = [
            r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=16, mtp=False)
        ]
        for k in (1, 2, "auto"):
            spec = stream_generate(model, tokenizer, prompt, max_tokens=16, num_draft=k, seed=0)
            assert [r.token for r in spec] == plain, (prompt, k)
    drafts = np.concatenate([d for d, _ in rounds])
    assert len(drafts) > 0 and np.isin(drafts, ids).all()
    assert model.draft_logits(mx.zeros((1, 1, model.config.hidden_size))).shape[-1] == 512


def test_a_refusal_offers_the_plan_without_the_drafter_and_its_shortlist():
    """What fits instead, for a plan whose drafter does not fit: --no-mtp, and with it no
    --draft-vocab (the shortlist is the drafter's)."""
    from mlxkit.ios_bridge.plan import PlanRefused, evaluate
    from mlxkit.ios_bridge.refusal import refusal_message

    lean = evaluate(SRC, None, 1024, memory_budget=10**9, mtp=False).total
    full = evaluate(SRC, None, 1024, memory_budget=10**9, draft_vocab=N).total
    with pytest.raises(PlanRefused) as refused:
        plan(SRC, None, 1024, memory_budget=(lean + full) // 2, draft_vocab=N)
    assert "no MTP head (--no-mtp, without --draft-vocab): up to" in refusal_message(refused.value)


def test_a_mac_plan_counts_the_head_rows_mlxkit_copies(bundles):
    """mlxkit's loop (a Mac) drafts over a copy of the head's N rows (`ShortlistHead`): the
    plan's drafter part holds those bytes beside the file; MLX Swift ignores the file, so an
    iPhone plan holds the file only."""
    from mlxkit.ios_bridge.plan import evaluate

    recipe = manifest(bundles["with"])["quantization"]["recipe"]  # what convert --target chose

    def mtp_part(target: str, **kw) -> int:
        return evaluate(SRC, target, 1024, dtype="float32", recipe=recipe, **kw).weights["mtp"]

    file = draft_vocab.file_bytes(512, N)
    assert mtp_part("iphone12", draft_vocab=N) - mtp_part("iphone12") == file
    copied = mtp_part("m1pro-16gb", draft_vocab=N) - mtp_part("m1pro-16gb") - file
    head = load(bundles["with"])[0].draft_head
    rows = [head.weight, head.scales, head.biases]
    assert copied == sum(a.nbytes for a in rows if a is not None) > 0
