"""Benchmark: `mlxkit convert` against `mlx_lm.convert -q` on synthetic real-size checkpoints.

    nice -n 10 python benchmarks/convert.py                 # 0.8B and 4B shapes
    nice -n 10 python benchmarks/convert.py --sizes 0.8b,4b,9b --repeats 2
    python benchmarks/convert.py --auto --sizes 4b,9b --layers 4 --calibration-tokens 256

For each size, one random-weight checkpoint in the original layout is written
(benchmarks/make_checkpoint.py), then converted to 4-bit by each tool in turn, in fresh
processes, on the same machine in the same run; the tools alternate on repeats so that
neither always meets a warmer page cache. Each conversion is timed and its peak resident
memory measured from outside: the parent polls /proc/<pid>/status (VmHWM) and takes the
child's ru_maxrss from wait4(), reporting the larger. The two outputs are checked to hold
identical text and MTP tensors (mlxkit also keeps the vision tower, which mlx-lm drops). Checkpoints and outputs are deleted as soon as they are measured.
Results go to benchmarks/results/convert.md (and stdout).

`--auto` measures `mlxkit convert --recipe auto --bits-per-weight 4.5` instead, on checkpoints
cut to `--layers` decoder layers (each count given: 4,8) without the vision tower: its peak
RSS, measured the same way (and the checkpoint writer's), and from the converting process
itself its VmHWM and MLX's peak memory when the measurement returned and at the end, the
time of the sensitivity measurement (with a fresh cache) and the whole conversion's. The
CLI has no option for the calibration tokens; `--calibration-tokens N` passes N to the
measurement from the process that runs the CLI (its memory does not grow with them: see
convert/sensitivity.py). Its section is appended to the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from machine import machine

RESULTS = Path(__file__).parent / "results" / "convert.md"


@dataclass
class Run:
    tool: str
    size: str
    seconds: float
    peak_rss: int  # bytes
    output_bytes: int


def vm_hwm(pid: int | str = "self") -> int:
    """VmHWM of a process in bytes: the kernel's high-water mark of its resident memory."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, measured from this process by polling the
    child's /proc/<pid>/status for VmHWM, the kernel's high-water mark of its resident memory.
    (Not wait4's ru_maxrss: Linux carries the forking parent's high-water mark across exec.)"""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a chatty child never blocks
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        hwm = 0
        while proc.poll() is None:
            try:
                hwm = max(hwm, vm_hwm(proc.pid))
            except (OSError, ValueError, StopIteration):  # exiting, or gone
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, hwm


AUTO_CHILD = """
import json, sys
import mlx.core as mx
import mlxkit.convert.sensitivity as sens
from mlxkit.cli import main
tokens, report, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
measure, facts = sens.measure_sensitivity, {}
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
def measured(directory, **kw):
    s = measure(directory, max_tokens=tokens or sens.DEFAULT_TOKENS, **kw)
    facts.update(sensitivity_seconds=s.seconds, tokens=s.tokens, groups=len(s.groups))
    facts.update(sensitivity_hwm=hwm(), sensitivity_mlx_peak=mx.get_peak_memory())
    return s
sens.measure_sensitivity = measured
main(args, standalone_mode=False)
facts.update(mlx_peak=mx.get_peak_memory(), hwm=hwm())
with open(report, "w") as f:
    json.dump(facts, f)
"""


@dataclass
class AutoRun:
    size: str
    layers: int
    seconds: float
    peak_rss: int  # bytes
    make_peak_rss: int  # bytes, of the process that wrote the checkpoint
    facts: dict  # from the converting process: mlx_peak, hwm, sensitivity_seconds, _hwm, ...


def run_auto(size: str, layers: int, work: Path, tokens: int, bpw: float) -> AutoRun:
    """`mlxkit convert --recipe auto` of a fresh checkpoint cut to `layers`, with a fresh
    sensitivity cache (so that the measurement runs)."""
    src, out, report = work / f"{size}-{layers}", work / f"{size}-{layers}-auto", work / "facts"
    make = [sys.executable, str(Path(__file__).parent / "make_checkpoint.py"), "--size", size]
    make += ["--layers", str(layers), "--no-vision", str(src)]
    _, make_peak = measure(make)
    os.environ["XDG_CACHE_HOME"] = str(work / f"cache-{size}-{layers}")  # inherited by the child
    args = ["convert", "--hf-path", str(src), "-o", str(out), "--recipe", "auto"]
    args += ["--bits-per-weight", str(bpw), "--quiet"]
    try:
        cmd = [sys.executable, "-c", AUTO_CHILD, str(tokens), str(report), *args]
        seconds, peak = measure(cmd)
        facts = json.loads(report.read_text())
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    run = AutoRun(size, layers, seconds, peak, make_peak, facts)
    print(
        f"{size} {layers} layers: {seconds:.0f} s (sensitivity {facts['sensitivity_seconds']:.0f}"
        f" s on {facts['tokens']} tokens), peak RSS {peak / 2**30:.2f} GiB (after the "
        f"sensitivity {facts['sensitivity_hwm'] / 2**30:.2f}), MLX peak "
        f"{facts['mlx_peak'] / 2**30:.2f} GiB; checkpoint writer {make_peak / 2**30:.2f} GiB",
        flush=True,
    )
    return run


def auto_report(runs: list[AutoRun], info: dict, argv: list[str]) -> str:
    lines = [
        "",
        f"## `convert --recipe auto` memory, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        (
            f"`python benchmarks/convert.py {' '.join(argv)}`: `mlxkit convert --recipe auto "
            "--bits-per-weight B` of random-weight checkpoints cut to a few decoder layers at full "
            "width (no vision tower; MTP head included), the sensitivity measured afresh. Peak RSS "
            "of the converting process: VmHWM polled from outside over the whole run, and read "
            "inside it when the measurement returned; MLX peak: `mx.get_peak_memory()` there, at "
            "the same two points. The checkpoint writer and this benchmark's own process are "
            "separate processes (VmHWM of each)."
        ),
        "",
        (
            "| size | layers | calibration tokens | groups | sensitivity s | total s | converter "
            "peak RSS MiB: after the measurement / whole run | MLX peak MiB: measurement / whole "
            "| checkpoint writer MiB | benchmark MiB | ≤ 1.5e9 B |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in runs:
        f = r.facts
        lines.append(
            f"| {r.size} | {r.layers} | {f['tokens']} | {f['groups']} | "
            f"{f['sensitivity_seconds']:.0f} | {r.seconds:.0f} | {f['sensitivity_hwm'] / mib:,.0f}"
            f" / {r.peak_rss / mib:,.0f} | {f['sensitivity_mlx_peak'] / mib:,.0f} / "
            f"{f['mlx_peak'] / mib:,.0f} | {r.make_peak_rss / mib:,.0f} | {vm_hwm() / mib:,.0f} | "
            f"{'yes' if r.peak_rss <= 1.5e9 else 'no'} |"
        )
    lines += ["", "Machine:", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    return "\n".join(lines)


def commands(tool: str, src: Path, out: Path) -> list[str]:
    if tool == "mlxkit":
        return [
            sys.executable,
            "-m",
            "mlxkit",
            "convert",
            "--hf-path",
            str(src),
            "-o",
            str(out),
            "--quiet",
        ]
    return [
        sys.executable,
        "-m",
        "mlx_lm",
        "convert",
        "--hf-path",
        str(src),
        "--mlx-path",
        str(out),
        "-q",
    ]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


SAME_TENSORS = """
import sys
from pathlib import Path
import mlx.core as mx
def tensors(d):
    return {k: v for f in sorted(Path(d).glob("*.safetensors")) for k, v in mx.load(str(f)).items()}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
a = {k: v for k, v in a.items() if not k.startswith("vision_tower.")}  # mlx-lm drops the tower
same = a.keys() == b.keys() and all(
    a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)
sys.exit(0 if same else 1)
"""


def same_tensors(a: Path, b: Path) -> bool:
    """In a child process, so that this (measuring) process stays small."""
    proc = subprocess.run([sys.executable, "-c", SAME_TENSORS, str(a), str(b)], check=False)
    return proc.returncode == 0


def run_size(size: str, work: Path, repeats: int, tools: list[str]) -> tuple[list[Run], bool]:
    src = work / f"qwen3.5-{size}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "make_checkpoint.py"),
            "--size",
            size,
            str(src),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(
        f"{size}: checkpoint {dir_bytes(src) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    runs, identical = [], None
    try:
        for r in range(repeats):
            order = tools if r % 2 == 0 else tools[::-1]
            outs = {}
            for tool in order:
                out = work / f"{size}-{tool}"
                seconds, peak = measure(commands(tool, src, out))
                runs.append(Run(tool, size, seconds, peak, dir_bytes(out)))
                print(f"  {tool:7s} {seconds:6.1f} s  peak RSS {peak / 2**30:.2f} GiB", flush=True)
                outs[tool] = out
            if identical is None and len(outs) == 2:
                identical = same_tensors(outs["mlxkit"], outs["mlx_lm"])
            for out in outs.values():
                shutil.rmtree(out)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return runs, identical


def report(runs: list[Run], identical: dict, info: dict, argv: list[str]) -> str:
    lines = [
        "# Converter benchmark: `mlxkit convert` vs `mlx_lm.convert -q`",
        "",
        (
            f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with "
            f"`nice -n 10 python benchmarks/convert.py {' '.join(argv)}`."
        ),
        (
            "Synthetic random-weight checkpoints in the original Hugging Face layout "
            "(benchmarks/make_checkpoint.py: bf16, vision tower and MTP head included), "
            "converted to 4-bit (group 64, bf16 elsewhere) by each tool in a fresh process; "
            "mlxkit keeps the vision tower (bf16) and the MTP drafter, mlx-lm drops both. "
            "Wall time and peak RSS (VmHWM of the converting process, polled every 20 ms from "
            "outside) per run; the table shows the best of the repeats for each tool."
        ),
        "",
        "| size | tool | wall s | peak RSS GiB | output GB | time vs mlx-lm | memory vs mlx-lm |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in dict.fromkeys(r.size for r in runs):
        best = {}
        for r in runs:
            if r.size == size:
                b = best.get(r.tool)
                best[r.tool] = Run(
                    r.tool,
                    size,
                    min(r.seconds, b.seconds) if b else r.seconds,
                    min(r.peak_rss, b.peak_rss) if b else r.peak_rss,
                    r.output_bytes,
                )
        ref = best.get("mlx_lm")
        for tool, r in best.items():
            ratio_t = f"{r.seconds / ref.seconds:.2f}x" if ref else "-"
            ratio_m = f"{r.peak_rss / ref.peak_rss:.2f}x" if ref else "-"
            lines.append(
                f"| {size} | {tool} | {r.seconds:.1f} | {r.peak_rss / 2**30:.2f} | "
                f"{r.output_bytes / 1e9:.2f} | {ratio_t} | {ratio_m} |"
            )
    lines += ["", "All runs (wall s / peak RSS GiB):", ""]
    for r in runs:
        lines.append(f"- {r.size} {r.tool}: {r.seconds:.1f} s / {r.peak_rss / 2**30:.2f} GiB")
    lines += [
        "",
        "Outputs hold identical text tensors (names, dtypes, bytes; mlxkit's vision tower "
        "and drafter aside): "
        + ", ".join(
            f"{s}: {'yes' if v else 'no' if v is not None else 'not compared'}"
            for s, v in identical.items()
        ),
        "",
    ]
    lines += ["Machine:", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.8b,4b")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tools", default="mlxkit,mlx_lm")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="do not update results/convert.md")
    ap.add_argument("--auto", action="store_true", help="measure convert --recipe auto")
    ap.add_argument("--layers", default="4", help="with --auto: decoder layer counts, e.g. 4,8")
    ap.add_argument("--calibration-tokens", type=int, default=0, help="with --auto [1024]")
    ap.add_argument("--bits-per-weight", type=float, default=4.5, help="with --auto")
    args = ap.parse_args()
    info = machine()  # before the work, so the load average is the starting one
    work = Path(tempfile.mkdtemp(prefix="mlxkit-bench-", dir=args.work))
    if args.auto:
        try:
            auto = [
                run_auto(size, int(n), work, args.calibration_tokens, args.bits_per_weight)
                for size in args.sizes.split(",")
                for n in args.layers.split(",")
            ]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        text = auto_report(auto, info, sys.argv[1:])
        print(text)
        if not args.no_write:
            with RESULTS.open("a") as f:
                f.write(text)
        return
    runs, identical = [], {}
    try:
        for size in args.sizes.split(","):
            size_runs, identical[size] = run_size(size, work, args.repeats, args.tools.split(","))
            runs += size_runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(runs, identical, info, sys.argv[1:])
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
