"""A 0.8B-shaped vision tower (random weights, the real shapes: depth 12, hidden 768, 12 heads,
out 1024, patch 16, temporal 2, merge 2, 48x48 positions; benchmarks/make_checkpoint.py)
exported with three grids in float16 and float32, each export in a child process whose time
and peak resident memory are reported, then run by the test interpreter against transformers
in float64. About ten minutes here: `python -m pytest -m slow tests/test_coreml_slow.py -s`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import coremltools as ct
import pytest
from mlxkit.convert.coreml import (
    INPUT_NAME,
    OUTPUT_NAME,
    WEIGHT_FILE,
    function_name,
    weight_file_bytes,
)

from benchmarks.coreml_vision import psnr
from mlxkit.models.qwen3_5_vision import VisionConfig
from mlxkit.presets import vision_config
from tests.coreml_models import (
    ROTARY_TABLES,
    Reference,
    blob_consts,
    errors,
    random_patches,
    write_vision_checkpoint,
)
from tests.mil_interpreter import Package

GRIDS = [(32, 32), (36, 26), (26, 36)]  # the default grids at 256 vision tokens
CHILD = """
import sys
from mlxkit.convert.coreml import export_vision_encoder
grids = [tuple(int(s) for s in g.split("x")) for g in sys.argv[3].split(",")]
export_vision_encoder(sys.argv[1], sys.argv[2], grids, precision=sys.argv[4])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


def report(line: str) -> None:
    print(f"\n{line}", end="", flush=True)


def export(src: Path, out: Path, precision: str) -> tuple[float, int, str]:
    """(seconds, peak resident bytes, what the export printed) of an export in a child."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(src),
            str(out),
            ",".join(f"{r}x{c}" for r, c in GRIDS),
            precision,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    return time.perf_counter() - t0, int(proc.stdout.split()[-1]), proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_0_8b_shaped_tower_exports_three_grids(tmp_path):
    config = vision_config("0.8b")  # out_hidden_size 1024, the 0.8B text width
    assert (config["depth"], config["hidden_size"], config["num_heads"]) == (12, 768, 12)
    src = write_vision_checkpoint(tmp_path / "src", config, seed=8)
    packages = {}
    for precision in ("float16", "float32"):
        out = tmp_path / f"VisionEncoder-{precision}.mlpackage"
        seconds, peak, printed = export(src, out, precision)
        report(
            f"{precision}: export {seconds:.0f} s, peak memory {peak / 1e9:.2f} GB\n"
            + printed.strip()
        )
        assert peak < 4e9
        packages[precision] = out

    f16 = packages["float16"]
    consts = blob_consts(ct.utils.load_spec(str(f16)))
    first = consts[function_name(GRIDS[0])]
    params = sum(n for k, (_, _, n, _) in first.items() if not k.startswith(ROTARY_TABLES))
    assert round(params / 1e6, 1) == 100.6  # 0.8B's vision tower as published
    weight_bytes = (f16 / WEIGHT_FILE).stat().st_size
    shared = {o for _, o, _, _ in first.values()}
    tables = {
        (k, o, n) for c in consts.values() for k, (_, o, n, _) in c.items() if o not in shared
    }
    assert all(k.startswith(ROTARY_TABLES) for k, _, _ in tables)
    extra = sum(2 * n for _, _, n in tables)
    report(
        f"weight file {weight_bytes:,} bytes = {weight_bytes / params:.4f} bytes per "
        f"parameter; the two further grids add {extra:,} bytes of rotary tables"
    )
    assert 2.0 <= weight_bytes / params < 2.001
    tower = VisionConfig.from_dict({"vision_config": config})
    for precision, path in packages.items():  # what the planner counts, to the byte
        size = (path / WEIGHT_FILE).stat().st_size
        assert size == weight_file_bytes(tower, GRIDS, precision), precision

    reference = Reference(src)
    interpreters = {precision: Package(path) for precision, path in packages.items()}
    for i, grid in enumerate(GRIDS):
        patches = random_patches(grid, 3 * 2 * 16 * 16, seed=i)
        ref = reference(patches, grid)
        for precision, package in interpreters.items():
            out = package.run(function_name(grid), {INPUT_NAME: patches})[OUTPUT_NAME]
            rel, cos = errors(out, ref)
            report(
                f"{precision} {function_name(grid)}: max rel error {rel:.2e}, "
                f"min cosine {cos:.7f}, PSNR {psnr(out, ref):.1f} dB"
            )
            if precision == "float32":
                assert rel <= 1e-5, (grid, rel)
            else:
                assert cos >= 0.9999, (grid, cos)
