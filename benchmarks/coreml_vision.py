"""On a Mac: the exported Core ML vision encoder against mlxkit's MLX vision tower, function by
function, with Core ML's own rounding on the compute units it is given, and its speed.

    mlxkit export-coreml MODEL -o VisionEncoder.mlpackage
    python benchmarks/coreml_vision.py MODEL VisionEncoder.mlpackage              # CPU_AND_NE
    python benchmarks/coreml_vision.py MODEL VisionEncoder.mlpackage --compute-units ALL

For each function (grid) the same seeded patches (normalized pixels in [-1, 1]) go through
Core ML and through mlxkit's vision tower (`mlxkit.models.qwen3_5_vision`, float32, on the
same weights). It prints the PSNR of Core ML's output against mlxkit's (ml-stable-diffusion's
definition, 20 log10(max|ref| / RMS error); it accepts 35 dB), the largest error relative
to max|ref|, the smallest cosine between an output token and mlxkit's, and the median time
of a Core ML call after a warm-up call (the first call of a function also compiles it for
the device). Exits 1 if a function is below 35 dB.

Core ML prediction needs macOS; everything else here also runs on Linux (the tests drive
`compare` with their interpreter in place of Core ML).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlxkit.convert.coreml import (
    COMPUTE_UNITS,
    INPUT_NAME,
    OUTPUT_NAME,
    function_name,
    package_grids,
    read_vision_weights,
    vision_config,
)

from mlxkit.models.qwen3_5_vision import VisionConfig, VisionModel

MIN_PSNR = 35.0  # dB, what ml-stable-diffusion accepts for a converted model

Predict = Callable[[str, np.ndarray], np.ndarray]  # (function, patches) -> embeddings


@dataclass
class Row:
    function: str
    tokens: int
    psnr: float
    max_rel_error: float
    min_cosine: float
    ms: float | None  # median Core ML time per call


def psnr(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    rms = np.sqrt(np.mean((out - ref) ** 2))
    return float(20 * np.log10(np.abs(ref).max() / max(rms, 1e-30)))


def coreml_predictor(package: Path, compute_units: str) -> Predict:
    import coremltools as ct

    models = {}

    def predict(function: str, patches: np.ndarray) -> np.ndarray:
        if function not in models:
            models[function] = ct.models.MLModel(
                str(package),
                function_name=function,
                compute_units=getattr(ct.ComputeUnit, compute_units),
            )
        return models[function].predict({INPUT_NAME: patches})[OUTPUT_NAME]

    return predict


def mlx_reference(model_dir: Path, cfg: VisionConfig) -> Predict:
    """mlxkit's MLX vision tower (float32) on the same weights, one image per call."""
    import mlx.core as mx

    tower = VisionModel(cfg)
    weights = read_vision_weights(model_dir, cfg)
    tower.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)

    def predict(function: str, patches: np.ndarray) -> np.ndarray:
        rows, cols = (int(s) for s in function.removeprefix("grid_").split("x"))
        return np.array(tower(mx.array(patches), [(1, rows, cols)]))

    return predict


def compare(
    package: Path, cfg: VisionConfig, predict: Predict, reference: Predict, repeats: int = 0
) -> list[Row]:
    """One Row per function of `package`; `repeats` timed calls of `predict` after one."""
    rows = []
    for i, grid in enumerate(package_grids(package)):
        function = function_name(grid)
        patches = np.random.default_rng(i).uniform(-1, 1, (grid[0] * grid[1], cfg.patch_dim))
        patches = patches.astype(np.float32)
        out = np.asarray(predict(function, patches), np.float64)
        ref = np.asarray(reference(function, patches), np.float64)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predict(function, patches)
            times.append(time.perf_counter() - t0)
        cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
        rows.append(
            Row(
                function=function,
                tokens=grid[0] * grid[1] // cfg.spatial_merge_size**2,
                psnr=psnr(out, ref),
                max_rel_error=float(np.abs(out - ref).max() / np.abs(ref).max()),
                min_cosine=float(cos.min()),
                ms=1000 * statistics.median(times) if times else None,
            )
        )
    return rows


def format_table(rows: list[Row], compute_units: str) -> str:
    header = "| function | vision tokens | PSNR (dB) | max rel error | min cosine | Core ML ms"
    lines = [f"{header} ({compute_units}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = "" if r.ms is None else f"{r.ms:.1f}"
        lines.append(
            f"| {r.function} | {r.tokens} | {r.psnr:.1f} | {r.max_rel_error:.2e} | "
            f"{r.min_cosine:.6f} | {ms} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="the model directory the package was exported from")
    ap.add_argument("package", type=Path, help="the .mlpackage written by mlxkit export-coreml")
    ap.add_argument(
        "--compute-units",
        default=COMPUTE_UNITS,
        choices=["CPU_AND_NE", "ALL", "CPU_AND_GPU", "CPU_ONLY"],
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per function")
    args = ap.parse_args()
    cfg = vision_config(args.model)
    rows = compare(
        args.package,
        cfg,
        coreml_predictor(args.package, args.compute_units),
        mlx_reference(args.model, cfg),
        args.repeats,
    )
    print(format_table(rows, args.compute_units))
    low = [r.function for r in rows if r.psnr < MIN_PSNR]
    if low:
        print(f"below {MIN_PSNR:.0f} dB: {', '.join(low)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
