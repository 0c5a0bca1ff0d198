"""A bundle of real width: the one-layer 0.8B-shaped checkpoint (248,320 x 1024 embedding,
real layer shapes) through `mlxkit convert --target iphone12`, then `bundle verify`; the
plan's bytes per part must equal what the safetensors headers on disk say, exactly."""

from __future__ import annotations

import json

from click.testing import CliRunner
from mlxkit.ios_bridge import plan, verify_bundle
from mlxkit.ios_bridge.verify import weight_bytes_on_disk

from mlxkit.cli import main


def test_08b_width_bundle_for_iphone12_is_what_was_planned(small_real_width, tmp_path):
    out = tmp_path / "Qwen3.5-0.8B-1layer-iphone12"
    args = ["convert", "--hf-path", str(small_real_width), "--target", "iphone12", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = verify_bundle(out)
    assert report.ok, [(c.name, c.detail) for c in report.checks]

    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    settings = {"recipe": q["recipe"], "bits": q["bits"], "mtp": manifest["mtp"]["included"]}
    settings |= {
        "kv_bits": manifest["kv_cache"]["bits"],
        "prefill_chunk": manifest["prefill_chunk"],
    }
    p = plan(small_real_width, "iphone12", manifest["max_context"], **settings)
    on_disk = weight_bytes_on_disk(out, manifest)
    assert on_disk == p.weights and on_disk["embeddings"] > 248320 * 1024 // 2  # exact, per part
    assert manifest["memory"]["peak_bytes"] == p.total <= manifest["memory"]["usable_bytes"]
    assert manifest["mtp"]["num_draft"] == p.num_draft == 1  # what mlx-swift-lm drafts
