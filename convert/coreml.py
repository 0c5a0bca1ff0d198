"""`mlxkit export-coreml`: the Qwen 3.5 vision encoder as a Core ML package, so an iPhone app
can encode images on the Neural Engine while MLX generates on the GPU (the split Apple's
FastVLM app uses: a Core ML vision encoder feeding an MLX language model).

The package is an ML Program for iOS 18 (float16 compute, meant for CPU_AND_NE) holding one
function per patch grid, `grid_{rows}x{cols}`, all sharing one weight file. A function
takes the flattened patches of one image (or one temporal group of a video) in
transformers' order, [rows*cols, C*T*P*P] float32, and returns the merged embeddings that
replace the image pads, [rows*cols / merge^2, out_hidden_size] float32. Fixed shapes
per function are what lets the Neural Engine run every grid (a flexible shape runs there
only at its default).

The default grids are what `smart_resize` gives a large square, 3:4 (portrait) and 4:3
(landscape) photo under caps of 256, 576 and 1,024 vision tokens; an app resizes a picture
to the grid nearest its aspect ratio. torch and coremltools (the `coreml` extra) are
imported only when an export runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from mlxkit import __version__
from mlxkit.checkpoint import read_config, read_headers, weight_files
from mlxkit.errors import CheckpointError, ConfigError, MlxkitError
from mlxkit.fields import shown
from mlxkit.info import human_bytes
from mlxkit.layout import VISION_TOKEN_KEYS
from mlxkit.models.qwen3_5_vision import (
    HF_PREFIX,
    PREFIX,
    VisionConfig,
    VisionModel,
    sanitize_vision_tensor,
)
from mlxkit.vision import Preprocessor

if TYPE_CHECKING:  # imports torch, which an export imports only when it runs
    from .coreml_encoder import VisionTower

INPUT_NAME = "patches"
OUTPUT_NAME = "embeddings"
PRECISIONS = ("float16", "float32")
TOKEN_BUDGETS = (256, 576, 1024)
ASPECTS = ((1, 1), (3, 4), (4, 3))  # width : height
# Attention is over all patches of a grid: 4,096 vision tokens are 16,384 patches at merge 2,
# and their float16 scores alone are heads x 512 MB. Nothing larger fits a phone.
MAX_VISION_TOKENS = 4096
MAX_GRID_DIGITS = 6  # of a grid's rows or cols as written: 4,096 tokens fit far fewer patches
COMPUTE_UNITS = "CPU_AND_NE"
SPEC_FILE = "Data/com.apple.CoreML/model.mlmodel"  # inside the package, as coremltools writes it
WEIGHT_FILE = "Data/com.apple.CoreML/weights/weight.bin"  # one file, shared by all functions
INSTALL_HINT = "pip install 'mlxkit[coreml]'"
# How coremltools' blob writer lays out the weight file (milstorage): a 64-byte file header,
# then each constant of at least MIN_BLOB_VALUES values as a 64-byte header and its data,
# padded to 64 bytes except the last; smaller constants are stored in the spec itself.
BLOB_ALIGNMENT = 64
MIN_BLOB_VALUES = 10
# Peak memory of an export: the tower read as float32 and held by torch, one grid's
# conversion, and per grid the float16 weights `save_multifunction` loads for every function
# before it finds them equal and shares them (2 bytes a parameter). Fitted to two 0.8B-shaped
# float16 exports measured here (100.6M parameters: 1.96 GB with three grids, 3.21 GB with the
# nine default ones; the estimate gives 1.98 and 3.19).
EXPORT_PEAK_FIXED = 500_000_000
EXPORT_PEAK_PER_PARAMETER = 8.75
EXPORT_PEAK_PER_PARAMETER_AND_GRID = 2.0

Grid = tuple[int, int]  # (rows, cols) of patches, as image_grid_thw's h and w


def vision_config(model_dir: Path) -> VisionConfig:
    """The checked vision config of a model directory (either layout), or why there is none."""
    config = read_config(model_dir)
    if not isinstance(config.get("vision_config"), dict):
        raise CheckpointError(
            f"{model_dir / 'config.json'}: no vision_config; this model has no vision tower"
        )
    return VisionConfig.from_dict(config)


# --- grids -----------------------------------------------------------------------------------


def function_name(grid: Grid) -> str:
    return f"grid_{grid[0]}x{grid[1]}"


def vision_tokens(grid: Grid, merge: int) -> int:
    return grid[0] * grid[1] // merge**2


def default_grids(merge: int) -> list[Grid]:
    """For each token budget and aspect (w:h), the largest grid of that shape within the budget:
    merged sides floor(sqrt(T*h/w)) x floor(sqrt(T*w/h)), as smart_resize caps a large photo."""
    grids = []
    for budget in TOKEN_BUDGETS:
        for w, h in ASPECTS:
            rows, cols = math.isqrt(budget * h // w), math.isqrt(budget * w // h)
            grids.append((rows * merge, cols * merge))
    return grids


def parse_grids(specs: list[str] | tuple[str, ...]) -> list[Grid]:
    """["32x32,36x26", ...]: rows x cols of patches (checked against a config by check_grids).
    A side is read only up to MAX_GRID_DIGITS digits: Python refuses to convert an integer of
    thousands of digits with a ValueError, and no grid is wider than a few hundred patches."""
    grids: list[Grid] = []
    for spec in specs:
        for item in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
            if match is None:
                raise ConfigError(
                    f"grid {shown(item.strip())}: write ROWSxCOLS in patches, e.g. 32x32"
                )
            if max(len(match[1]), len(match[2])) > MAX_GRID_DIGITS:
                raise ConfigError(
                    f"grid {shown(item.strip())}: rows and cols have at most {MAX_GRID_DIGITS} "
                    f"digits (a grid holds at most {MAX_VISION_TOKENS} vision tokens)"
                )
            grids.append((int(match[1]), int(match[2])))
    return grids


def check_grids(grids: list[Grid], merge: int) -> list[Grid]:
    """The grids as (rows, cols) tuples of ints, or a ConfigError for the first bad one."""
    if not grids:
        raise ConfigError("no grids to export")
    checked = []
    for grid in grids:
        if len(grid) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid):
            raise ConfigError(f"grid {grid!r}: give (rows, cols) as two integers")
        rows, cols = grid
        name = f"{rows}x{cols}"
        if rows <= 0 or cols <= 0 or rows % merge or cols % merge:
            raise ConfigError(
                f"grid {name}: rows and cols must be positive multiples of the spatial merge "
                f"size {merge} (patches merge {merge}x{merge} into one token)"
            )
        if vision_tokens((rows, cols), merge) > MAX_VISION_TOKENS:
            raise ConfigError(
                f"grid {name}: {vision_tokens((rows, cols), merge)} vision tokens; at most "
                f"{MAX_VISION_TOKENS} are supported (attention over all patches grows as N^2)"
            )
        checked.append((rows, cols))
    if len(set(checked)) != len(checked):
        raise ConfigError("a grid is listed twice")
    return checked


def nearest_grid(
    grids: list[Grid], width: int, height: int, merge: int, max_tokens: int | None = None
) -> Grid:
    """The grid an app resizes a `width` x `height` picture to: of the grids within
    `max_tokens` vision tokens (all, if None or none is), the one whose aspect ratio is
    nearest the picture's (in log ratio, so 2:1 and 1:2 are equally far from 1:1), and of
    those the one with the most tokens. The generated Swift (MLXKitVisionEncoder.swift) makes
    the same choice."""
    if width <= 0 or height <= 0:
        raise ConfigError(f"a {width}x{height} picture has no aspect ratio")
    within = [g for g in grids if max_tokens is None or vision_tokens(g, merge) <= max_tokens]
    target = math.log(width / height)
    return min(
        within or grids,
        key=lambda g: (abs(math.log(g[1] / g[0]) - target), -vision_tokens(g, merge)),
    )


def grid_patches(image, grid: Grid, pre: Preprocessor) -> np.ndarray:
    """A function's input for a picture (a path, a PIL image or an HxWx3 uint8 array), made as
    the bundle's Swift glue (MLXKitVisionEncoder.swift) makes it: the picture as RGB, resized
    to exactly rows·P x cols·P pixels (its aspect ratio bent to the grid's), then mlxkit.vision's
    rescaling, normalization and patch order."""
    from mlxkit.vision import load_image, resized_patches, to_rgb

    rows, cols = grid
    patches, _ = resized_patches(
        to_rgb(load_image(image)), (rows * pre.patch_size, cols * pre.patch_size), pre
    )
    return patches


# --- what a package holds and costs ----------------------------------------------------------


def weight_file_bytes(cfg: VisionConfig, grids: list[Grid], precision: str = "float16") -> int:
    """The size of the weight file `export_vision_encoder` writes for `grids`, from the config
    alone: every parameter once (the functions share them), and each grid's rotary tables (cos
    and sin per row and per column: rows or cols x head_dim/4 values) that no earlier grid has.
    The first function is written whole (its last constant is the merger's output bias), each
    further one adds its new tables, so the last blob, the one left unpadded, is the last new
    table. Assumes no two parameters hold identical values, as in any trained tower:
    coremltools stores identical constants once (an untrained tower whose LayerNorm weights
    are all ones comes out smaller)."""
    itemsize = 2 if precision == "float16" else 4
    values = parameter_counts(cfg)
    last = cfg.out_hidden_size  # merger.linear_fc2.bias, the first function's last constant
    quarter = cfg.hidden_size // cfg.num_heads // 4
    seen: set[tuple[str, int]] = set()
    for i, (rows, cols) in enumerate(grids):
        for key in (("cos_rows", rows), ("sin_rows", rows), ("cos_cols", cols), ("sin_cols", cols)):
            n = key[1] * quarter
            if key not in seen and n >= MIN_BLOB_VALUES:
                values.append(n)
                last = n if i else last
            seen.add(key)
    blobs = [n * itemsize for n in values if n >= MIN_BLOB_VALUES]
    padding = -(last * itemsize) % BLOB_ALIGNMENT
    return BLOB_ALIGNMENT + sum(BLOB_ALIGNMENT + b + -b % BLOB_ALIGNMENT for b in blobs) - padding


def parameter_counts(cfg: VisionConfig) -> list[int]:
    """Values per parameter tensor of the tower (`VisionModel`'s parameters are lazy: free)."""
    from mlx.utils import tree_flatten

    return [math.prod(v.shape) for _, v in tree_flatten(VisionModel(cfg).parameters())]


def export_peak_estimate(parameters: int, grids: int) -> int:
    """About how much memory an export of `grids` functions needs (see EXPORT_PEAK_*)."""
    per_parameter = EXPORT_PEAK_PER_PARAMETER + EXPORT_PEAK_PER_PARAMETER_AND_GRID * grids
    return int(EXPORT_PEAK_FIXED + parameters * per_parameter)


# --- weights ---------------------------------------------------------------------------------

_FLOAT_DTYPES = ("BF16", "F16", "F32")  # safetensors dtypes the vision weights may have
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def read_vision_weights(
    model_dir: Path, cfg: VisionConfig, precision: str = "float32"
) -> dict[str, np.ndarray]:
    """The vision tower's tensors in mlxkit's layout (`VisionModel`'s parameter names, the
    patch embedding channels-last), as float32, from either checkpoint layout: transformers'
    `model.visual.*` goes through `sanitize_vision_tensor`, `vision_tower.*` is already it.
    Every tensor is checked against `VisionModel(cfg)`, whose parameters are lazy (free), and
    for values the export cannot hold (`_check_values`) before anything is traced."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .reader import read_rows

    expected = {k: tuple(v.shape) for k, v in tree_flatten(VisionModel(cfg).parameters())}
    found = {
        n: i
        for n, i in read_headers(weight_files(model_dir)).items()
        if n.startswith((HF_PREFIX, PREFIX))
    }
    if not found:
        raise CheckpointError(
            f"{model_dir}: no vision tower weights ({HF_PREFIX}* or {PREFIX}*); "
            "was it converted without vision?"
        )
    if len({n.startswith(HF_PREFIX) for n in found}) > 1:
        raise CheckpointError(f"{model_dir}: vision weights in both {HF_PREFIX}* and {PREFIX}*")
    weights = {}
    for name, info in found.items():
        where = f"{info.file}: {name}"
        if name.endswith((".scales", ".biases")):
            raise CheckpointError(
                f"{where}: the vision tower is quantized; export from a checkpoint whose vision "
                "weights are float (the original, or a conversion without --vision-bits)"
            )
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where} has dtype {info.dtype}; expected a float")
        value = read_rows(info, 0, info.shape[0] if info.shape else 1)
        if name.startswith(HF_PREFIX):
            name, value = sanitize_vision_tensor(name, value)
        key = name[len(PREFIX) :]
        if key not in expected:
            raise CheckpointError(f"{where} is not a Qwen 3.5 vision-tower tensor")
        if tuple(value.shape) != expected[key]:
            raise CheckpointError(
                f"{where} has shape {tuple(value.shape)} in mlxkit's layout, expected "
                f"{expected[key]} from vision_config"
            )
        weights[key] = np.array(value.astype(mx.float32))
        _check_values(weights[key], where, precision)
    for key in expected:
        if key not in weights:
            raise CheckpointError(f"{model_dir}: missing tensor {PREFIX}{key}")
    return weights


def _check_values(value: np.ndarray, where: str, precision: str) -> None:
    """A NaN or infinity (a corrupt checkpoint, refused as convert refuses it) would otherwise
    reach torch's tracer, which fails on it with an AssertionError; a value beyond float16's
    range would become infinite in a float16 package."""
    if not np.isfinite(value).all():
        raise CheckpointError(f"{where} holds NaN or infinite values; the checkpoint is corrupt")
    if precision == "float16" and value.size and np.abs(value).max() > FLOAT16_MAX:
        raise ConfigError(
            f"{where} has values beyond float16's range (they would become infinite in the "
            "float16 package); export with --precision float32, or use --vision-encoder mlx"
        )


# --- export ----------------------------------------------------------------------------------


@dataclass
class ExportResult:
    output: Path
    grids: list[Grid]
    precision: str
    parameters: int  # of the vision tower
    weight_bytes: int  # the shared weight file
    files: dict[str, str]  # package-relative path -> sha256
    bytes: int  # the whole package
    seconds: float
    peak_memory: int  # peak resident memory of this process

    @property
    def functions(self) -> list[str]:
        return [function_name(g) for g in self.grids]

    @property
    def sha256(self) -> str:
        return package_digest(self.files)


def export_vision_encoder(
    model: str | Path,
    output: str | Path,
    grids: list[Grid] | None = None,
    *,
    precision: str = "float16",
    force: bool = False,
    quiet: bool = False,
    shown_as: Path | None = None,
) -> ExportResult:
    """Writes the vision tower of `model` (a directory in the Hugging Face or the converted
    MLX layout) to the package `output` (`*.mlpackage`), one function per grid (default:
    `default_grids`). Everything is checked before anything is written; the package is
    assembled beside `output` and renamed into place only when complete. `shown_as`: the path
    the summary names when `output` is itself inside a folder renamed into place later (a
    bundle's), whose hidden name means nothing to the user."""
    from . import output as out_rules  # convert/output.py: what may be replaced, and how
    from .converter import _absolute

    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = _absolute(output)
    if out.suffix != ".mlpackage":
        raise ConfigError(f"{out}: the output must be a .mlpackage path")
    ct, torch = import_coreml()
    model_dir = Path(model).expanduser()
    cfg = vision_config(model_dir)
    grids = default_grids(cfg.spatial_merge_size) if grids is None else grids
    grids = check_grids(grids, cfg.spatial_merge_size)
    pre = Preprocessor.from_dir(model_dir, cfg)
    config = read_config(model_dir)
    token_ids = {k: config[k] for k in VISION_TOKEN_KEYS if isinstance(config.get(k), int)}
    out_rules.check_destination(out, force, written_by_export, "Core ML package")
    out_rules.check_apart_from_source(out, model_dir)
    tower, parameters = _load_tower(model_dir, cfg, precision)
    # each grid is converted to its own package first, then merged into one
    _check_disk(out, (len(grids) + 1) * parameters * (2 if precision == "float16" else 4))
    say = (lambda *_a, **_k: None) if quiet else (lambda *a, **k: click.echo(*a, err=True, **k))
    say(
        f"exporting {len(grids)} functions; coremltools holds every function's weights until "
        f"it shares them: about {human_bytes(export_peak_estimate(parameters, len(grids)))} "
        "of memory at the peak"
    )
    with out_rules.assembling(out, "partial") as work:
        packages = _convert_grids(ct, torch, tower, cfg, grids, precision, work, say)
        say(f"writing {len(grids)} functions with shared weights")
        package = work / out.name
        _save_multifunction(ct, packages, grids, package)
        _describe(ct, package, cfg, grids, precision, pre, token_ids)
        files = package_files(package)
        out_rules.replace_dir(package, out)
    result = _result(out, grids, precision, parameters, files, t0)
    say(format_summary(result, shown_as or out))
    return result


def _load_tower(model_dir: Path, cfg: VisionConfig, precision: str) -> tuple[VisionTower, int]:
    """The torch tower, which shares the weights' memory (nothing is copied), and its
    parameter count, which the disk and memory estimates are sized from."""
    weights = read_vision_weights(model_dir, cfg, precision)

    from .coreml_encoder import VisionTower

    return VisionTower.from_weights(cfg, weights), sum(v.size for v in weights.values())


def _convert_grids(
    ct,
    torch,
    tower: VisionTower,
    cfg: VisionConfig,
    grids: list[Grid],
    precision: str,
    work: Path,
    say: Callable[..., None],
) -> list[Path]:
    """One package per grid in `work`, to be merged into one; a line of progress each, since a
    large grid takes a while to trace and convert."""
    from .coreml_encoder import GridEncoder

    packages = []
    for i, grid in enumerate(grids):
        t1 = time.perf_counter()
        tokens = vision_tokens(grid, cfg.spatial_merge_size)
        say(f"[{i + 1}/{len(grids)}] {function_name(grid)}, {tokens} vision tokens: ", nl=False)
        path = work / f"{function_name(grid)}.mlpackage"
        _convert_grid(ct, torch, GridEncoder(tower, *grid), cfg, grid, precision, path)
        packages.append(path)
        say(f"converted in {time.perf_counter() - t1:.1f} s")
    return packages


def _result(
    out: Path,
    grids: list[Grid],
    precision: str,
    parameters: int,
    files: dict[str, str],
    t0: float,
) -> ExportResult:
    """Measured on the package once it is in place, so that the sizes are those of the files
    an app ships and the time counts the whole export."""
    from .converter import _peak_rss

    return ExportResult(
        output=out,
        grids=grids,
        precision=precision,
        parameters=parameters,
        weight_bytes=(out / WEIGHT_FILE).stat().st_size,
        files=files,
        bytes=sum((out / p).stat().st_size for p in files),
        seconds=time.perf_counter() - t0,
        peak_memory=_peak_rss(),
    )


def written_by_export(package: Path) -> bool:
    """A package this export wrote (so --force may replace it): exactly the files it writes,
    none a link, and its spec carries mlxkit's metadata."""
    try:
        entries = list(package.rglob("*"))
        if any(p.is_symlink() for p in entries):
            return False
        files = {p.relative_to(package).as_posix() for p in entries if p.is_file()}
        ours = b"mlxkit.grids" in (package / SPEC_FILE).read_bytes()
    except OSError:
        return False
    return files == {"Manifest.json", SPEC_FILE, WEIGHT_FILE} and ours


def _check_disk(out: Path, need: int) -> None:
    from .converter import DISK_MARGIN

    parent = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < need + DISK_MARGIN:
        raise MlxkitError(
            f"not enough disk space at {parent}: the export needs about "
            f"{human_bytes(need + DISK_MARGIN)}, {human_bytes(free)} is free"
        )


def import_coreml(purpose: str = "Core ML export", need_torch: bool = True):
    """coremltools and torch (None unless `need_torch`: reading a spec needs only
    coremltools), or one line saying how to get them. coremltools' import-time notices (an
    untested torch version; no prediction on Linux) are not the user's business: the export
    is verified by reading the package back, not by coremltools' test matrix."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    torch = None
    try:
        import coremltools as ct

        if need_torch:
            import torch
    except ImportError as e:
        needs = "torch and coremltools" if need_torch else "coremltools"
        raise MlxkitError(f"{purpose} needs {needs} ({e}): {INSTALL_HINT}") from None
    finally:
        logger.setLevel(level)
    return ct, torch


def _convert_grid(ct, torch, module, cfg: VisionConfig, grid: Grid, precision: str, path: Path):
    n = grid[0] * grid[1]
    # torch.jit.trace, deprecated by torch, is still coremltools' mature path: its torch.export
    # path converts gelu(approximate="tanh") as the exact gelu (coremltools PR #2863, open).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.trace", DeprecationWarning)
        # check_trace would run the tower twice more to compare (minutes on a 1,024-token grid);
        # the tests compare the converted program with transformers instead
        traced = torch.jit.trace(module, torch.zeros(n, cfg.patch_dim), check_trace=False)
    # coremltools draws four progress bars per conversion on stderr; ours is one line a grid
    with contextlib.redirect_stderr(io.StringIO()):
        ct.convert(
            traced,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=(n, cfg.patch_dim), dtype=np.float32)],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=(
                ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32
            ),
            compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS),
            package_dir=str(path),
            skip_model_load=True,
        )


def _save_multifunction(ct, packages: list[Path], grids: list[Grid], out: Path) -> None:
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    desc = MultiFunctionDescriptor()
    for package, grid in zip(packages, grids):
        desc.add_function(str(package), "main", function_name(grid))
    desc.default_function_name = function_name(grids[0])
    with contextlib.redirect_stderr(io.StringIO()):
        save_multifunction(desc, str(out))


def _describe(
    ct,
    package: Path,
    cfg: VisionConfig,
    grids: list[Grid],
    precision: str,
    pre: Preprocessor,
    token_ids: dict[str, int],
) -> None:
    """What an app needs to know, in the spec Xcode shows: inputs, outputs, grids, and how to
    make the input (the preprocessing, the tower's config and the token ids of the source's
    config.json, as JSON). `save_multifunction` writes a bare description, so it is filled in
    here."""
    spec = ct.utils.load_spec(str(package))
    m = cfg.spatial_merge_size
    meta = spec.description.metadata
    meta.shortDescription = (
        "Qwen 3.5 vision encoder: flattened image patches -> merged embeddings for the "
        "language model's image pads; one function per patch grid"
    )
    meta.userDefined.update(
        {
            "mlxkit.version": __version__,
            "mlxkit.grids": ",".join(f"{r}x{c}" for r, c in grids),
            "mlxkit.precision": precision,
            "mlxkit.compute_units": COMPUTE_UNITS,
            "mlxkit.patch_size": str(cfg.patch_size),
            "mlxkit.temporal_patch_size": str(cfg.temporal_patch_size),
            "mlxkit.spatial_merge_size": str(m),
            "mlxkit.preprocessing": json.dumps(preprocessing(pre)),
            "mlxkit.vision_config": json.dumps(dataclasses.asdict(cfg)),
            "mlxkit.token_ids": json.dumps(token_ids),
        }
    )
    for function in spec.description.functions:
        (inp,), (outp,) = function.input, function.output
        inp.shortDescription = (
            f"[rows*cols, {cfg.patch_dim}] patches of one image (C*T*P*P each), in the order "
            "of transformers' Qwen2VLImageProcessor"
        )
        outp.shortDescription = (
            f"[rows*cols/{m * m}, {cfg.out_hidden_size}] embeddings, one per vision token"
        )
    (package / SPEC_FILE).write_bytes(spec.SerializeToString())


def package_files(package: Path) -> dict[str, str]:
    files = {}
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        files[path.relative_to(package).as_posix()] = digest.hexdigest()
    return files


def package_digest(files: dict[str, str]) -> str:
    """One digest of a package: of its files' paths and sha256, sorted."""
    listing = "".join(f"{path}\0{digest}\n" for path, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def preprocessing(pre: Preprocessor) -> dict:
    """What an app needs to make a function's input from a picture resized to its grid."""
    return {
        "patch_size": pre.patch_size,
        "temporal_patch_size": pre.temporal_patch_size,
        "merge_size": pre.merge_size,
        "rescale_factor": pre.rescale_factor,
        "image_mean": list(pre.image_mean),
        "image_std": list(pre.image_std),
    }


@dataclass(frozen=True)
class PackageSpec:
    """What a saved package's spec says (read with skip_model_load=True: nothing compiled)."""

    specification_version: int
    default_function: str
    functions: list[dict]  # {name, input: [{name, shape, dtype}], output: [...]}
    metadata: dict[str, str]  # the spec's userDefined metadata


def read_package_spec(package: Path) -> PackageSpec:
    """The spec of `package`, or one line saying why it cannot be read."""
    ct, _ = import_coreml("reading a Core ML package", need_torch=False)
    array = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def feature(f) -> dict:
        t = f.type.multiArrayType
        return {"name": f.name, "shape": list(t.shape), "dtype": array.Name(t.dataType).lower()}

    try:
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    except Exception as e:  # noqa: BLE001 - coremltools raises whatever protobuf and IO raise
        raise MlxkitError(f"{package}: not a readable Core ML package ({e})") from None
    d = spec.description
    functions = [
        {
            "name": f.name,
            "input": [feature(i) for i in f.input],
            "output": [feature(o) for o in f.output],
        }
        for f in d.functions
    ]
    return PackageSpec(
        spec.specificationVersion, d.defaultFunctionName, functions, dict(d.metadata.userDefined)
    )


def vision_config_of(data: object, where: str) -> VisionConfig:
    """The tower config an export recorded (`dataclasses.asdict` of it, as JSON), checked."""
    try:
        cfg = VisionConfig(**data)  # type: ignore[arg-type]
        cfg._check()
    except (TypeError, MlxkitError) as e:
        raise MlxkitError(f"{where}: not a vision tower config ({e})") from None
    return cfg


def package_grids(package: Path) -> list[Grid]:
    """The grids of an exported package, from its function names (the spec alone is read)."""
    ct, _ = import_coreml("reading a Core ML package", need_torch=False)
    grids = []
    for function in ct.utils.load_spec(str(package)).description.functions:
        side = rf"(\d{{1,{MAX_GRID_DIGITS}}})"
        match = re.fullmatch(rf"grid_{side}x{side}", function.name)
        if match is None:
            raise MlxkitError(
                f"{package}: function {shown(function.name)} is not an export-coreml grid"
            )
        grids.append((int(match[1]), int(match[2])))
    return grids


def format_summary(result: ExportResult, shown_as: Path) -> str:
    functions = ", ".join(result.functions)
    per_parameter = result.weight_bytes / result.parameters
    return "\n".join(
        [
            f"wrote {shown_as} ({human_bytes(result.bytes)}): {len(result.grids)} functions "
            + f"({functions}), {result.precision} compute, {COMPUTE_UNITS}",
            f"weights {human_bytes(result.weight_bytes)}, shared by all functions "
            + f"({per_parameter:.2f} bytes per parameter)",
            f"{result.seconds:.1f} s, peak memory {human_bytes(result.peak_memory)}",
        ]
    )


# --- command ---------------------------------------------------------------------------------


@click.command("export-coreml")
@click.argument("model", type=click.Path())
@click.option(
    "-o", "--output", required=True, type=click.Path(), help="The package to write (*.mlpackage)."
)
@click.option(
    "--grids",
    multiple=True,
    help="Patch grids ROWSxCOLS, comma-separated (default: square, 3:4 and 4:3 at about 256, "
    "576 and 1,024 vision tokens).",
)
@click.option(
    "--precision",
    default="float16",
    show_default=True,
    type=click.Choice(PRECISIONS),
    help="Compute precision (the Neural Engine runs float16).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress, no summary.")
def export_coreml(
    model: str, output: str, grids: tuple[str, ...], precision: str, force: bool, quiet: bool
) -> None:
    """Export MODEL's vision encoder as a Core ML multifunction package (one function per
    grid, shared weights) for the Neural Engine. Needs the coreml extra."""
    parsed = parse_grids(grids) if grids else None
    export_vision_encoder(model, output, parsed, precision=precision, force=force, quiet=quiet)
