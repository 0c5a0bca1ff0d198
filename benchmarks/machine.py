"""The machine a benchmark ran on, for its results file (benchmarks import it as a sibling
module: they run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict[str, str]:
    """CPU, RAM, OS and library versions, plus the load average when called."""
    import mlx.core as mx
    import mlx_lm

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal"))
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "RAM": f"{mem / 2**30:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "mlx": f"{mx.__version__} ({'Metal' if mx.metal.is_available() else 'CPU build'})",
        "mlx-lm": mlx_lm.__version__,
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
