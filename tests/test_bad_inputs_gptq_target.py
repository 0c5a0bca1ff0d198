"""Bad inputs of learned rounding in plans and bundles (`plan`, `convert --target`, `bundle
build`, `bundle verify`): an unknown rounding is refused in one line before anything is
converted, and a bundle whose manifest misstates its rounding fails verify. The harness is
tests/badinput.py; the built bundle (tiny_tied, nearest rounding) is test_bad_inputs.py's."""

from __future__ import annotations

import pytest
from mlxkit.ios_bridge import build_bundle
from mlxkit.ios_bridge.choose import choose_plan

from tests.badinput import api, cli, edit_json, run_row
from tests.test_bad_inputs import built, manifest  # noqa: F401 - the module's fixture

UNKNOWN = "--rounding must be one of nearest, gptq, got 'awq'"


def verify(id: str, *args: str, **kw):
    """`mlxkit bundle verify {bundle} --no-load` and `args`, with the bundle and tiny_tied."""
    return cli(
        f"verify: {id}", "bundle", "verify", "{bundle}", "--no-load", *args,
        needs=("bundle", "src"), **kw,
    )  # fmt: skip


# fmt: off
ROWS = [
    cli("plan --rounding awq", "plan", "--model", "{src}", "--target", "iphone12",
        "--rounding", "awq", message=UNKNOWN),
    cli("convert --target --rounding awq", "convert", "--hf-path", "{src}", "--target",
        "iphone12", "--rounding", "awq", "-o", "{out}", message=UNKNOWN),
    cli("bundle build --rounding awq", "bundle", "build", "{src}", "{out}", "--target",
        "iphone12", "--rounding", "awq", message=UNKNOWN),
    api("build_bundle(rounding=None)",
        lambda i: build_bundle(i.src, i.out, "iphone12", rounding=None),
        message="--rounding must be one of nearest, gptq, got None"),
    api("choose_plan(rounding=[gptq])",
        lambda i: choose_plan(str(i.src), "iphone12", rounding=["gptq"]),
        message="--rounding must be one of nearest, gptq, got ['gptq']"),
    verify("a manifest that calls nearest rounding's weights gptq",
           setup=edit_json(manifest, lambda m: m["quantization"].update(rounding="gptq")),
           code=1, message="quantization.rounding: manifest says 'gptq', re-derived 'nearest'"),
    verify("a prediction labelled as GPTQ's", "--quality", "--reference", "{src}",
           setup=edit_json(manifest, lambda m: m.update(quality={
               "method": "predicted", "rounding": "gptq", "kl_mean": 0.1, "tokens": 8})),
           code=1, message="quality.rounding: the manifest's figures are predicted for 'gptq'"),
]
# fmt: on


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_gptq_target_input(row, tmp_path, monkeypatch, built):  # noqa: F811
    run_row(row, tmp_path, monkeypatch, built)
