"""docs/iphone.md's generated section (tiers, bundles, the memory and speed table, how the plan
is computed) comes from the planner; it must match the planner now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "make_iphone_table.py"


def test_iphone_page_section_is_current():
    spec = importlib.util.spec_from_file_location("make_iphone_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.current_section()
    assert text == module.render(), (
        "docs/iphone.md's generated section is stale: run python tools/make_iphone_table.py"
    )
    assert text.count("| Qwen3.5-") == 24 and text.count("refused") >= 4


def package_folder(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools takes `package` from: the longest mapped prefix, then subfolders."""
    mapped = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
    rest = package[len(mapped) + 1 :].split(".") if package != mapped else []
    return ROOT.joinpath(package_dir[mapped], *rest)


def test_no_development_script_ships_in_the_wheel():
    """The packages pyproject.toml ships hold no script (a module with a __main__ guard):
    scripts that rewrite repository files live in tools/ and benchmarks/."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = [package_folder(p, setuptools["package-dir"]) for p in setuptools["packages"]]
    scripts = sorted(
        path.relative_to(ROOT).as_posix()
        for folder in folders
        for path in folder.glob("*.py")
        if '__name__ == "__main__"' in path.read_text()
    )
    assert scripts == []
    assert ROOT / "ios_bridge" in folders and ROOT / "mlxkit" / "serve" in folders
