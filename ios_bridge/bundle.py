"""`build_bundle`: plan for a phone, convert, and package — one folder an app can ship.

    OUT/
      model/          the MLX model directory (loads by itself in mlx-lm, MLX Swift, mlxkit)
      mtp/            the MTP drafter (qwen3_5_mtp), when included
      manifest.json   what is inside, what it needs, sha256 of every file
      xcode/          Entitlements.plist, Info-BackgroundAssets.plist, MLXKitBundle.swift, README

The plan comes first, so a model that cannot fit is refused before a byte is converted.
Without explicit choices the recipe and MTP inclusion are picked by the planner: the first
of (quality recipe + MTP, uniform + MTP, uniform without MTP) that leaves room for
DEFAULT_CONTEXT tokens (or the requested context). The converter writes the drafter inside
its output (`model/mtp/`, where mlxkit.load looks for it); the bundle moves it beside
`model/` so that each directory is a plain, self-contained model directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlxkit import __version__
from mlxkit.errors import MlxkitError
from mlxkit.load import BUNDLE_MODEL_DIR as MODEL_DIR
from mlxkit.load import MTP_DIR
from mlxkit.models.qwen3_5 import TextConfig

from .devices import ENTITLEMENT, Target, resolve_target
from .manifest import FORMAT, MANIFEST, SCHEMA_VERSION, file_entries
from .plan import MIN_CONTEXT, Plan, PlanRefused, evaluate, plan
from .serialize import memory_to_dict, plan_to_dict, target_to_dict
from .xcode import write_xcode

DEFAULT_CONTEXT = 4096  # what an automatic choice must leave room for, when it can
APP_BASELINE = 40 * 2**20  # the part of the runtime reserve already in use at the app's check
MANIFEST_ALLOWANCE = 1 << 20  # bytes counted for manifest.json in the download sizes


def _candidates(recipe: str | None, mtp: bool | None, has_mtp: bool) -> list[tuple[str, bool]]:
    recipes = [recipe] if recipe else ["quality", "uniform"]
    mtps = [mtp and has_mtp] if mtp is not None else ([True, False] if has_mtp else [False])
    out = []
    for m in mtps:
        for r in recipes if m else recipes[-1:]:
            out.append((r, m))
    return out


def choose_plan(
    cfg: TextConfig, tgt: Target, *, recipe: str | None, bits: int | None, mtp: bool | None,
    has_mtp: bool, context: int | None, name: str | None = None, **settings,
) -> Plan:  # fmt: skip
    """The first candidate (recipe, MTP) whose largest context reaches the requested one, or
    DEFAULT_CONTEXT, or at least MIN_CONTEXT; PlanRefused (naming what fits) otherwise.
    Without a requested context the bundle gets the largest context that fits, within the
    default memory limit when that still reaches DEFAULT_CONTEXT (so the app needs no
    entitlement), else within the increased limit."""
    candidates = _candidates(recipe, mtp, has_mtp)
    limit = cfg.max_position_embeddings
    needs = [context] if context else [min(DEFAULT_CONTEXT, limit), min(MIN_CONTEXT, limit)]
    for need in needs:
        for r, m in candidates:
            p = evaluate(cfg, tgt, None, name, recipe=r, bits=bits, mtp=m, **settings)
            if p.fits and p.max_context >= need:
                if context is None and settings.get("entitlement", True):
                    # Ask for no capability the app does not need: when the default limit
                    # leaves room for `need` tokens, plan the bundle within it.
                    lean = {**settings, "entitlement": False}
                    q = evaluate(cfg, tgt, None, name, recipe=r, bits=bits, mtp=m, **lean)
                    if q.fits and q.max_context >= need:
                        return plan(cfg, tgt, recipe=r, bits=bits, mtp=m, name=name, **lean)
                return plan(cfg, tgt, context=context, recipe=r, bits=bits, mtp=m, name=name,
                            **settings)  # fmt: skip
    r, m = candidates[0]
    return plan(cfg, tgt, context=context, recipe=r, bits=bits, mtp=m, name=name,
                **settings)  # refuses  # fmt: skip


def _source_info(directory: Path) -> dict:
    """Repo and revision when the checkpoint is a Hugging Face cache snapshot
    (…/models--Org--Name/snapshots/<revision>/)."""
    parts = directory.resolve().parts
    repo = revision = None
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3][len("models--") :].replace("--", "/")
        revision = parts[-1]
    return {"path": str(directory.resolve()), "repo": repo, "revision": revision}


def make_manifest(p: Plan, source: dict, has_mtp_dir: bool) -> dict:
    """The manifest without `files` (they are hashed once everything is written)."""
    d = plan_to_dict(p)
    memory = memory_to_dict(p)
    memory["check_available_bytes"] = max(0, p.total - APP_BASELINE)
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "created_by": f"mlxkit {__version__}",
        "model": {
            "name": p.model,
            "size": p.size,
            "model_type": "qwen3_5",
            "path": MODEL_DIR,
            "mtp_path": MTP_DIR if has_mtp_dir else None,
        },
        "source": source,
        "target": target_to_dict(p),
        "min_ios": p.target.min_ios,
        "entitlement_required": p.entitlement_required,
        "entitlements": [ENTITLEMENT] if p.entitlement_required else [],
        "quantization": d["quantization"],
        "mtp": {
            "included": has_mtp_dir,
            "path": MTP_DIR if has_mtp_dir else None,
            "num_draft": p.settings.num_draft,
        },
        "max_context": p.context,
        "largest_context_that_fits": p.max_context,
        "prefill_chunk": p.settings.prefill_chunk,
        "memory": memory,
        "mlx": {"cache_limit_bytes": p.settings.cache_limit},
        "performance": d["performance"],
        "warnings": p.warnings,
        "files": [],
    }


def build_bundle(
    src: str | Path,
    out: str | Path,
    target: str | Target | None = None,
    *,
    memory_budget: int | str | None = None,
    bits: int | None = None,
    recipe: str | None = None,
    group_size: int | None = None,
    dtype: str = "bfloat16",
    context: int | None = None,
    entitlement: bool = True,
    mtp: bool | None = None,
    num_draft: int = 2,
    prefill_chunk: int = 512,
    acceptance: float = 0.7,
    force: bool = False,
    quiet: bool = True,
) -> dict:
    """Plans, converts `src` (a Hugging Face layout checkpoint directory, or a size name)
    into `out`, and writes manifest.json and xcode/. Returns the manifest."""
    import json

    from mlxkit.convert.converter import convert
    from mlxkit.convert.reader import SourceCheckpoint
    from mlxkit.convert.source import resolve_source

    out = Path(out).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not force:
        raise MlxkitError(f"{out} already exists; pass --force to replace it")
    tgt = target if isinstance(target, Target) else resolve_target(target, memory_budget)
    source = resolve_source(src)
    ckpt = SourceCheckpoint.open(source.directory, include_mtp=mtp is not False)
    p = choose_plan(
        ckpt.cfg, tgt, recipe=recipe, bits=bits, mtp=mtp, has_mtp=ckpt.has_mtp,
        context=context, name=source.name, group_size=group_size, dtype=dtype, entitlement=entitlement,
        num_draft=num_draft, prefill_chunk=prefill_chunk, acceptance=acceptance,
    )  # fmt: skip

    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        s = p.settings
        result = convert(source, tmp / MODEL_DIR, bits=s.bits, group_size=s.group_size,
                         recipe=s.recipe, dtype=s.dtype, quantize=True, mtp=s.mtp,
                         force=False, quiet=True)  # fmt: skip
        if (tmp / MODEL_DIR / MTP_DIR).is_dir():
            os.rename(tmp / MODEL_DIR / MTP_DIR, tmp / MTP_DIR)
        if result.bytes_by_part != p.weights:  # one source of truth: this is a bug if it fires
            raise MlxkitError(
                f"internal error: the converter wrote {result.bytes_by_part} but the plan "
                f"expected {p.weights}; please report it"
            )
        manifest = make_manifest(p, _source_info(source.directory), (tmp / MTP_DIR).is_dir())
        # What an app downloads: model/ and mtp/ plus manifest.json (not yet written: room
        # for it is reserved); xcode/ goes into the app project, not the download.
        download = MANIFEST_ALLOWANCE + sum(
            f.stat().st_size for d in (MODEL_DIR, MTP_DIR) for f in (tmp / d).rglob("*")
            if f.is_file()
        )  # fmt: skip
        write_xcode(tmp / "xcode", out.name, manifest, download)
        manifest["files"] = file_entries(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists() or out.is_symlink():
            if out.is_symlink() or not out.is_dir():
                raise MlxkitError(f"{out} exists and is not a directory; not replacing it")
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


__all__ = ["DEFAULT_CONTEXT", "PlanRefused", "build_bundle", "choose_plan", "make_manifest"]
