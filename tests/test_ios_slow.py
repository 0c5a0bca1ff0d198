"""A real-sized bundle: the 0.8B-shaped synthetic checkpoint (benchmarks/make_checkpoint.py)
through `mlxkit convert --target iphone12`, then `bundle verify`. Minutes, ~3 GB of disk:
run with `python -m pytest -m slow tests/test_ios_slow.py -s`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlxkit.ios_bridge import plan, verify_bundle
from mlxkit.ios_bridge.verify import weight_bytes_on_disk

from mlxkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
MAKER = ROOT / "benchmarks" / "make_checkpoint.py"


@pytest.mark.slow
def test_08b_bundle_for_iphone12(tmp_path):
    src, out = tmp_path / "qwen35-0.8b", tmp_path / "Qwen3.5-0.8B-iphone12"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(MAKER), "--size", "0.8b", "--no-vision", str(src)],
                   check=True, cwd=ROOT)  # fmt: skip
    t1 = time.perf_counter()
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(src), "--target", "iphone12", "-o", str(out)]
    )
    t2 = time.perf_counter()
    assert result.exit_code == 0, result.output
    report = verify_bundle(out)
    t3 = time.perf_counter()
    assert report.ok, [(c.name, c.detail) for c in report.checks]

    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    p = plan(src, "iphone12", recipe=q["recipe"], bits=q["bits"],
             mtp=manifest["mtp"]["included"], context=manifest["max_context"])  # fmt: skip
    assert weight_bytes_on_disk(out, manifest) == p.weights  # exact, per part
    assert manifest["memory"]["peak_bytes"] == p.total <= manifest["memory"]["usable_bytes"]
    print(
        f"\n0.8B-shaped checkpoint {t1 - t0:.0f} s; convert --target iphone12 {t2 - t1:.0f} s; "
        f"verify {t3 - t2:.0f} s\n{result.output}"
        f"weights by part {p.weights}\nbreakdown {manifest['memory']['breakdown']}\n"
        f"max context {manifest['max_context']}, recipe {q['recipe']}, MTP "
        f"{manifest['mtp']['included']}, entitlement {manifest['entitlement_required']}\n"
        + "\n".join(f"{c.name}: {c.detail}" for c in report.checks)
    )
