"""Bad inputs to the planner's quality and `bundle verify --quality`: each ends as one line
(exit 2, or exit 1 for a bundle that fails), leaves nothing behind and touches none of its
inputs. The harness is tests/badinput.py; the built bundle is test_bad_inputs.py's."""

from __future__ import annotations

import pytest
from mlxkit.ios_bridge.choose import choose_plan

from tests.badinput import api, cli, edit_json, run_row
from tests.test_bad_inputs import built, manifest  # noqa: F401 - the module's fixture


def verify_quality(id: str, *args: str, **kw):
    """`mlxkit bundle verify {bundle} --no-load` and `args`, with the bundle and tiny_tied."""
    return cli(
        f"verify: {id}",
        "bundle",
        "verify",
        "{bundle}",
        "--no-load",
        *args,
        needs=("bundle", "src"),
        **kw,
    )


def quality_block(block: object):
    """A setup: the manifest's quality block replaced (it is not in the sha256 list)."""
    return edit_json(manifest, lambda m: m.update(quality=block))


# fmt: off
ROWS = [
    verify_quality("--quality without --reference", "--quality",
                   message="pass both --quality and --reference SRC"),
    verify_quality("--reference without --quality", "--reference", "{src}",
                   message="pass both --quality and --reference SRC"),
    verify_quality("--reference missing", "--quality", "--reference", "{root}/missing",
                   message="missing"),
    verify_quality("--quality on a bundle without figures", "--quality", "--reference", "{src}",
                   code=1, message="quality vs the source"),
    verify_quality("quality block with an unknown method", "--quality", "--reference", "{src}",
                   code=1, message="quality vs the source",
                   setup=quality_block({"method": "guessed", "tokens": 8, "kl_mean": 0.1})),
    verify_quality("quality block a list", "--quality", "--reference", "{src}",
                   code=1, message="quality: expected dict or null",
                   setup=quality_block([1])),
    cli("plan: --recipe auto without a sensitivity measurement", "plan", "--model", "{src}",
        "--target", "iphone12", "--recipe", "auto", message="sensitivity measurement"),
    cli("plan: --recipe auto for a size", "plan", "--size", "2b", "--target", "iphone12",
        "--recipe", "auto", message="sensitivity measurement"),
    api("choose_plan: recipe auto without a measurement",
        lambda i: choose_plan(str(i.src), "iphone12", recipe="auto"),
        message="sensitivity measurement"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path, monkeypatch, built):  # noqa: F811 - the imported fixture
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run_row(row, tmp_path, monkeypatch, built)
