"""The repository carries every file its code, tests and docs use: nothing reads or cites the
project's notes folder beside the checkout (a user's clone has none; issue 21 item 3). The
calibration data lives in benchmarks/data/ with its sources."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".py", ".md", ".toml", ".txt", ".json", ".jinja", ".swift", ".cfg", ".yml", ".yaml"}
# written so that this file does not match itself
OUTSIDE = re.compile(r"\.\./share[d]\b|/work/share[d]\b|share[d]/(README|calibration)")


def repository_text_files() -> list[Path]:
    """Every text file of the working tree, not hidden folders (.git, virtual environments,
    caches) nor build outputs."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in ("__pycache__", "build", "dist")
            and not d.endswith(".egg-info")
        ]
        files += [Path(folder) / n for n in names if Path(n).suffix in TEXT]
    return files


def test_nothing_reads_or_cites_the_notes_folder_outside_the_repository():
    files = repository_text_files()
    assert ROOT / "benchmarks" / "data" / "mac_decode_speeds.md" in files
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_the_calibration_table_names_a_source_for_every_row_and_chip():
    text = (ROOT / "benchmarks" / "data" / "mac_decode_speeds.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \| Qwen3\.5-", line)]
    chips = [line for line in text.splitlines() if re.match(r"\| M\d", line)]
    assert len(rows) == 25 and len(chips) == 12
    for line in rows + chips:
        source = line.strip().strip("|").split("|")[-1].strip()
        assert source, line
