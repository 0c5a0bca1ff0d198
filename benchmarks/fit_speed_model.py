"""Fits the planner's decode-speed model on published Mac measurements, and shows how well.

    python benchmarks/fit_speed_model.py            # print the fit, write the residual table
    python benchmarks/fit_speed_model.py --write    # also write ios_bridge/speed_model.toml
    python benchmarks/fit_speed_model.py --check    # exit 1 if either file is out of date

Model: seconds per token = bytes read ÷ (efficiency × bandwidth) + a fixed cost per token,
with the bytes the planner computes for the row's model (4-bit `uniform`, what
`mlx_lm.convert -q` writes; no MTP: every row is plain decoding) at a 512-token context,
and the chip's bandwidth from the same table. Fitted by least squares on the relative error
of the time per token (so that a 20 tok/s row counts as much as a 500 tok/s one); linear in
(1/efficiency, fixed cost). Leave-one-out: each row predicted by the fit of the others.

Input: benchmarks/data/mac_decode_speeds.md (each row with its public source). Rows with
GGUF weights run llama.cpp, another engine and weight format than a bundle's: they are
shown, not fitted.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from mlxkit.ios_bridge.plan import make_settings, weight_plan
from mlxkit.ios_bridge.roofline import SPEED_MODEL_FILE, step_bytes

from mlxkit.models.qwen3_5 import TextConfig
from mlxkit.presets import text_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed_model.md"
SOURCE = "benchmarks/data/mac_decode_speeds.md"  # as cited in the files written
TABLE = ROOT / SOURCE
CONTEXT = 512  # tokens of context the bytes are computed at (KV is < 2 % of them there)
CHIP = re.compile(r"\bM\d(?: (?:Pro|Max|Ultra))?\b")


@dataclass(frozen=True)
class Row:
    number: int
    size: str  # "0.8b"
    chip: str  # "M4 Pro"
    engine: str
    bandwidth: float  # bytes/s
    tokens_per_s: float
    fitted: bool  # False: another engine and weight format (GGUF, llama.cpp)

    @property
    def label(self) -> str:
        return f"Qwen3.5-{self.size.upper()}"


def _first_bold_number(cell: str) -> float:
    """'**545.45**' -> 545.45; a range '**115.4–115.7**' -> its middle."""
    m = re.search(r"\*\*([\d.]+)(?:[–-]([\d.]+))?\*\*", cell)
    if not m:
        raise ValueError(f"no bold number in {cell!r}")
    low = float(m.group(1))
    return (low + float(m.group(2))) / 2 if m.group(2) else low


def read_rows(path: Path) -> list[Row]:
    text = path.read_text()
    bandwidth = {
        m.group(1): float(m.group(2)) * 1e9
        for m in re.finditer(r"^\| (M\d(?: Pro| Max| Ultra)?) \| (\d+)", text, re.MULTILINE)
    }
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or not cells[0].isdigit():
            continue
        number, model, weights, engine, device, speed = cells[:6]
        chip = CHIP.search(device).group(0)
        size = re.search(r"Qwen3\.5-([\d.]+B)", model).group(1).lower()
        speed_value = _first_bold_number(speed)
        fitted = "GGUF" not in weights
        rows.append(Row(int(number), size, chip, engine, bandwidth[chip], speed_value, fitted))
    return rows


@cache
def bytes_per_token(size: str) -> int:
    cfg = TextConfig.from_dict(text_config(size))
    weights = weight_plan(cfg, make_settings(recipe="uniform", mtp=False))
    return step_bytes(cfg, weights.reads, CONTEXT, 2)


def fit(rows: list[Row]) -> tuple[float, float]:
    """(efficiency, fixed seconds per token) minimising Σ ((x·a + c) / t − 1)², where
    x = bytes / bandwidth, t the measured seconds per token, a = 1 / efficiency."""
    x = np.array([bytes_per_token(r.size) / r.bandwidth for r in rows])
    t = np.array([1 / r.tokens_per_s for r in rows])
    a, c = np.linalg.lstsq(np.stack([x / t, 1 / t], axis=1), np.ones(len(rows)), rcond=None)[0]
    return 1 / a, c


def predicted_tps(row: Row, efficiency: float, fixed: float) -> float:
    return 1 / (bytes_per_token(row.size) / (efficiency * row.bandwidth) + fixed)


@dataclass(frozen=True)
class Fit:
    efficiency: float
    fixed_seconds: float
    rows: list[Row]
    in_sample: dict[int, float]  # row number -> predicted tok/s with all fitted rows
    leave_one_out: dict[int, float]  # row number -> predicted by the fit without it

    def error(self, row: Row, predictions: dict[int, float]) -> float:
        return predictions[row.number] / row.tokens_per_s - 1

    @property
    def loo_median_abs_error(self) -> float:
        fitted = [r for r in self.rows if r.fitted]
        return float(np.median([abs(self.error(r, self.leave_one_out)) for r in fitted]))


def fit_table(path: Path) -> Fit:
    rows = read_rows(path)
    fitted = [r for r in rows if r.fitted]
    efficiency, fixed = fit(fitted)
    in_sample = {r.number: predicted_tps(r, efficiency, fixed) for r in rows}
    loo = {}
    for r in fitted:
        e, c = fit([o for o in fitted if o is not r])
        loo[r.number] = predicted_tps(r, e, c)
    return Fit(efficiency, fixed, rows, in_sample, loo)


def render_results(result: Fit) -> str:
    lines = [
        "# Decode-speed model: fit on published Mac measurements",
        "",
        f"Written by `python benchmarks/fit_speed_model.py` from `{SOURCE}` (its rows as",
        "numbered there). Model: seconds per token = bytes read ÷ (efficiency × bandwidth) +",
        f"fixed cost, bytes from the planner (4-bit uniform, no MTP, {CONTEXT}-token context).",
        "",
        (
            f"- efficiency **{result.efficiency:.3f}**, fixed cost **{result.fixed_seconds * 1e3:.3f}"
            f" ms** per token, fitted on {sum(r.fitted for r in result.rows)} MLX rows"
        ),
        f"- leave-one-out median absolute error: **{result.loo_median_abs_error:.1%}**",
        "",
        (
            "| # | model | chip | GB/s | engine | measured tok/s | fit tok/s | error | "
            "leave-one-out tok/s | leave-one-out error |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        fit_cell = f"{result.in_sample[r.number]:.1f} | {result.error(r, result.in_sample):+.0%}"
        if r.fitted:
            loo = result.leave_one_out[r.number]
            loo_cell = f"{loo:.1f} | {result.error(r, result.leave_one_out):+.0%}"
        else:
            loo_cell = "not fitted (GGUF, llama.cpp) | "
        engine = re.split(r" \(|, ", r.engine)[0]
        lines.append(
            f"| {r.number} | {r.label} | {r.chip} | {r.bandwidth / 1e9:.0f} | {engine} | "
            f"{r.tokens_per_s:g} | {fit_cell} | {loo_cell} |"
        )
    outliers = [
        f"{r.number} ({r.label}, {r.chip}, {re.split(r' [(]|, ', r.engine)[0]})"
        for r in result.rows
        if r.fitted and abs(result.error(r, result.leave_one_out)) > 0.25
    ]
    lines += [
        "",
        (
            "Errors are predicted ÷ measured − 1 (positive: the model is too fast). Fitted rows "
            f"beyond ±25 % leave-one-out: {', '.join(outliers) or 'none'}."
        ),
    ]
    return "\n".join(lines) + "\n"


def render_parameters(result: Fit) -> str:
    return (
        "# Written by `python benchmarks/fit_speed_model.py --write` from\n"
        f"# {SOURCE}; the rows, errors and leave-one-out\n"
        "# errors are in benchmarks/results/speed_model.md. Do not edit by hand.\n"
        f"efficiency = {result.efficiency:.4f}\n"
        f"fixed_ms_per_token = {result.fixed_seconds * 1e3:.4f}\n"
        f"rows = {sum(r.fitted for r in result.rows)}\n"
        f"loo_median_abs_error = {result.loo_median_abs_error:.4f}\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--write", action="store_true", help="also write ios_bridge/speed_model.toml")
    ap.add_argument("--check", action="store_true", help="exit 1 if an output is out of date")
    args = ap.parse_args()
    result = fit_table(TABLE)
    outputs = {RESULTS: render_results(result)}
    if args.write or args.check:
        outputs[SPEED_MODEL_FILE] = render_parameters(result)
    if args.check:
        stale = [p for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
        for p in stale:
            print(f"{p} is out of date: run python benchmarks/fit_speed_model.py --write")
        return 1 if stale else 0
    for path, text in outputs.items():
        path.write_text(text)
    print(outputs[RESULTS])
    return 0


if __name__ == "__main__":
    sys.exit(main())
