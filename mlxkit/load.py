"""`load(path)`: a model directory in the Hugging Face or the MLX layout → (model, tokenizer).

Weights are memory-mapped by `mx.load` and stay lazy until first used. Every tensor is
checked against the model before anything is assigned, so a wrong checkpoint fails with one
line naming the file and tensor.

A checkpoint whose config.json declares a vision tower and whose weights hold it (Hugging Face
`model.visual.*` or converted `vision_tower.*`) loads with it: `model.has_vision`, the tower
at `model.vision_tower` (a `VisionModel`: patches and grids in, features for the image pads
out), the four token ids at `model.vision_tokens` and the image/video preprocessing settings at
`model.preprocessor`, and the text model's M-RoPE `mrope_section` at `model.mrope_section`.
Its weights are as lazy as the text weights: a text-only prompt never reads them.

A drafter directory holding `draft_vocab.json` (`mlxkit convert --draft-vocab N`) makes the
model draft over that shortlist of tokens (`mlxkit.draft_vocab`, `Model.use_draft_vocab`).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from mlxkit import draft_vocab
from mlxkit.bundle_files import MANIFEST as BUNDLE_MANIFEST
from mlxkit.bundle_files import bundle_files, check_files, file_entries, read_manifest
from mlxkit.checkpoint import (
    TensorInfo,
    check_vision_token_ids,
    model_file,
    model_subdir,
    plain,
    quantization_block,
    read_config,
    read_headers,
    short,
    weight_files,
)
from mlxkit.errors import CheckpointError, ConfigError
from mlxkit.fields import local_path, shown
from mlxkit.layout import ModelConfig, checkpoint_tensor, part_of
from mlxkit.models.qwen3_5 import Model, TextConfig, sanitize_tensor

MTP_DIR = "mtp"  # where converted checkpoints keep the MTP drafter
BUNDLE_MODEL_DIR = "model"
LOADABLE_DTYPES = ("BF16", "F16", "F32", "U32")
CAST_DTYPES = (mx.bfloat16, mx.float16, mx.float32)  # what `dtype=` may cast weights to


def resolve_model_dir(path: str | Path) -> Path:
    """A local model directory; "micro" names the small trained model shipped inside the
    package, and an iPhone bundle resolves to its model/."""
    if str(path) == "micro":
        from mlxkit.micro import micro_dir

        return micro_dir()
    p = local_path(path, "model path", CheckpointError)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory; pass a local model directory")
    bundle = bundle_root(p)
    return bundle / BUNDLE_MODEL_DIR if bundle is not None else p


def bundle_root(path: str | Path) -> Path | None:
    """`path` itself when it is an iPhone bundle (manifest.json beside model/), else None."""
    p = local_path(path, "model path", CheckpointError)
    if (p / BUNDLE_MANIFEST).is_file() and (p / BUNDLE_MODEL_DIR).is_dir():
        return p
    return None


def check_bundle_files(bundle: Path, hashes: bool = False) -> None:
    """The bundle's model/ and mtp/ files are the ones its manifest lists, no more: same
    sizes (and sha256 with `hashes`). xcode/ is not looked at: it goes into the app
    project."""
    entries, problems = file_entries(read_manifest(bundle))
    wanted = [e for e in entries if e.path.split("/")[0] in (BUNDLE_MODEL_DIR, MTP_DIR)]
    problems += check_files(bundle, wanted, hashes=hashes)
    listed = {e.path for e in wanted}
    problems += [
        f"{short(rel, 60)} is not listed"
        for rel, _ in bundle_files(bundle)
        if rel.split("/")[0] in (BUNDLE_MODEL_DIR, MTP_DIR) and rel not in listed
    ]
    if not wanted and not problems:
        problems = ["manifest.json lists no model files"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"{bundle}: does not match its manifest.json: {problems[0]}{more}; "
            f"run `mlxkit bundle verify {bundle}`"
        )


def default_drafter_dir(path: str | Path) -> Path:
    """Where the MTP drafter of a converted model lives: <model>/mtp, or a bundle's mtp/."""
    model_dir = resolve_model_dir(path)
    if model_dir.name == BUNDLE_MODEL_DIR and (model_dir.parent / BUNDLE_MANIFEST).is_file():
        return model_dir.parent / MTP_DIR
    return model_dir / MTP_DIR


def _drafter_dir(path: str | Path, drafter: str | Path | bool | None) -> Path | None:
    """The drafter directory to read, None for none: one given must exist; the default one
    (mtp/ of a converted model, a bundle's mtp/) is used when there, and must lie inside."""
    if drafter is False:
        return None
    if drafter is not None:
        given = local_path(drafter, "drafter", CheckpointError)
        if not given.is_dir():
            raise CheckpointError(f"drafter {given}: not a directory; pass the drafter's folder")
        return given
    default = default_drafter_dir(path)
    return model_subdir(default.parent, default.name)


def load_config(model_dir: Path) -> TextConfig:
    try:
        return TextConfig.from_dict(read_config(model_dir))
    except ConfigError as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from None


def load_model_config(model_dir: Path) -> ModelConfig:
    """The text and vision configs of config.json, or one line naming the file."""
    try:
        return ModelConfig.from_dict(read_config(model_dir))
    except ConfigError as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from None


def _read_weights(
    model_dir: Path, cfg: TextConfig, dtype: mx.Dtype | None, vision: bool = False
) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Our parameter path → array, and path → "file: original name" for error messages.
    `vision`: the config declares a vision tower, so `model.visual.*` tensors are its."""
    files = weight_files(model_dir)
    headers = read_headers(files)
    _check_dtypes(headers)
    hf_layout = any(n.startswith("model.language_model.") for n in headers)
    weights, origin = {}, {}
    for f in files:
        for name, value in mx.load(str(f)).items():
            if hf_layout:
                item = checkpoint_tensor(name, value, cfg.tie_word_embeddings, dtype, vision)
                if item is None:
                    continue
                path, value = item
            else:
                path = name
                if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                    value = value if name.endswith("A_log") else value.astype(dtype)
            weights[path] = value
            origin[path] = f"{f}: tensor {plain(name)}"
    return weights, origin


def _check_dtypes(headers: dict[str, TensorInfo]) -> None:
    """Before MLX reads a byte (it cannot read F64 or F8_E5M2 at all): weights are floating
    point, or uint32 words of packed quantized weights."""
    for t in headers.values():
        if t.dtype not in LOADABLE_DTYPES:
            raise CheckpointError(
                f"{t.file}: tensor {plain(t.name)} has dtype {t.dtype}; expected a "
                "floating-point dtype (BF16, F16, F32) or U32 (packed quantized weights)"
            )


def _read_mtp_drafter(drafter_dir: Path, dtype: mx.Dtype | None) -> tuple[dict, dict, dict]:
    """A separate MTP drafter directory (converter output) in either layout the converter
    writes: names without the `mtp.` prefix and norms converted (mlx-vlm's split drafter, as
    OUT/mtp/), or the checkpoint's own `mtp.*` names with norms stored as w (iPhone bundles).
    As mlx-vlm's native-checkpoint splitter and mlx-swift-lm decide it, `mtp.` names in a
    file not marked `format: mlx` are in the checkpoint's convention: their norms get the 1
    added here."""
    config = read_config(drafter_dir)
    weights, origin = {}, {}
    for f in weight_files(drafter_dir):
        _check_dtypes(read_headers([f]))
        arrays, metadata = mx.load(str(f), return_metadata=True)
        as_checkpoint = metadata.get("format") != "mlx"
        for name, value in arrays.items():
            if as_checkpoint and name.startswith("mtp."):
                # the checkpoint's own names: only lm_head depends on the tie flag
                path, value = sanitize_tensor(name, value, True, dtype)
            else:
                path = name if name.startswith("mtp.") else "mtp." + name
                if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                    value = value.astype(dtype)
            weights[path] = value
            origin[path] = f"{f}: tensor {plain(name)}"
    quant = quantization_block(config, str(drafter_dir / "config.json"))
    quant = {
        (k if k.startswith("mtp.") or k in ("group_size", "bits", "mode") else "mtp." + k): v
        for k, v in quant.items()
    }
    return weights, origin, quant


def _quantize(model: Model, weights: dict[str, mx.array], quant: dict) -> None:
    """Swap in quantized layers exactly where the checkpoint has `<path>.scales`."""
    defaults = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quant.get(path)
        if override is False:
            return False
        params = {**defaults, **(override if isinstance(override, dict) else {})}
        if "bits" not in params or "group_size" not in params:
            raise CheckpointError(
                f"{path} is quantized but config.json has no quantization bits/group_size"
            )
        return params

    try:
        nn.quantize(model, class_predicate=predicate)
    except ValueError as e:  # MLX's word on bits / group sizes / modes it does not support
        raise CheckpointError(f"config.json quantization cannot be used: {e}") from None


def _check_against_model(
    model: Model, weights: dict[str, mx.array], origin: dict[str, str]
) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for path in weights:
        if path not in expected:
            raise CheckpointError(f"{origin[path]} is not a Qwen 3.5 text-model tensor")
    for path, param in expected.items():
        if path not in weights:
            raise CheckpointError(f"missing tensor {path} (the checkpoint has no such weight)")
        if weights[path].shape != param.shape:
            raise CheckpointError(
                f"{origin[path]} has shape {tuple(weights[path].shape)}, "
                f"expected {tuple(param.shape)} from config.json"
            )
        # Packed quantized weights are uint32; every other weight must be floating point.
        got, packed = weights[path].dtype, param.dtype == mx.uint32
        if (got == mx.uint32) != packed or not (packed or mx.issubdtype(got, mx.floating)):
            raise CheckpointError(
                f"{origin[path]} has dtype {got}, expected "
                f"{'uint32 (quantized)' if packed else 'a floating-point dtype'}"
            )


def _vision_of(
    shapes: ModelConfig, weights: dict[str, mx.array], origin: dict[str, str], config_path: Path
):
    """The vision tower to build: the declared one when the weights hold it. Tensors of a
    tower config.json does not declare are an error, not something to drop silently."""
    has_tower = any(part_of(p) == "vision" for p in weights)
    if has_tower and shapes.vision is None:
        first = next(p for p in weights if part_of(p) == "vision")
        raise CheckpointError(
            f"{origin[first]} belongs to a vision tower, but {config_path} has no vision_config"
        )
    return shapes.vision if has_tower else None


def _attach_vision_inputs(model: Model, model_dir: Path, config: dict) -> None:
    """What the runtime needs beside the tower to turn images into its input."""
    from mlxkit.vision import Preprocessor, VisionTokens, mrope_section

    check_vision_token_ids(model_dir, config)
    model.vision_tokens = VisionTokens.from_config(config)
    model.preprocessor = Preprocessor.from_dir(model_dir, model.vision_tower.config)
    try:
        section = mrope_section(config)
    except ConfigError as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from None
    if sum(section) != model.config.rotary_dim // 2:
        raise CheckpointError(
            f"{model_dir / 'config.json'}: mrope_section {list(section)} does not add up to "
            f"rotary_dim / 2 = {model.config.rotary_dim // 2}"
        )
    model.mrope_section = section


def load_model(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    drafter: str | Path | bool | None = None,
    verify: bool = False,
) -> Model:
    """The model alone. `dtype` (e.g. mx.float32) casts floating weights; A_log stays float32.
    `drafter` overrides where a converted model's MTP drafter is looked for. For an iPhone
    bundle the files of model/ and mtp/ are checked against manifest.json first: their
    sizes always, their sha256 with `verify` (a full read). `drafter=False` loads no
    drafter. The vision tower is loaded when the checkpoint has one, the drafter's draft
    vocabulary when it has one (see the module docstring)."""
    if dtype is not None and not (isinstance(dtype, mx.Dtype) and dtype in CAST_DTYPES):
        raise ConfigError(
            f"dtype must be None, mx.bfloat16, mx.float16 or mx.float32, got {shown(dtype)}"
        )
    model_dir = resolve_model_dir(path)
    bundle = bundle_root(path) if str(path) != "micro" else None
    if bundle is not None:
        check_bundle_files(bundle, hashes=verify)
    config = read_config(model_dir)
    shapes = load_model_config(model_dir)
    cfg = shapes.text
    weights, origin = _read_weights(model_dir, cfg, dtype, vision=shapes.vision is not None)
    vision = _vision_of(shapes, weights, origin, model_dir / "config.json")
    quant = dict(quantization_block(config, str(model_dir / "config.json")))
    drafter_dir = _drafter_dir(path, drafter)
    if drafter_dir is not None and not any(p.startswith("mtp.") for p in weights):
        mtp_weights, mtp_origin, mtp_quant = _read_mtp_drafter(drafter_dir, dtype)
        weights.update(mtp_weights)
        origin.update(mtp_origin)
        quant.update({k: v for k, v in mtp_quant.items() if k.startswith("mtp.")})
        if not quant.get("bits") and mtp_quant.get("bits"):
            quant.update(
                {k: mtp_quant[k] for k in ("group_size", "bits", "mode") if k in mtp_quant}
            )

    model = Model(cfg, has_mtp=any(p.startswith("mtp.") for p in weights), vision=vision)
    if any(p.endswith(".scales") for p in weights):
        _quantize(model, weights, quant)
    _check_against_model(model, weights, origin)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if model.has_vision:
        _attach_vision_inputs(model, model_dir, config)
    if drafter_dir is not None and model.has_mtp:
        shortlist = model_file(drafter_dir, draft_vocab.FILE, "draft vocabulary")
        if shortlist is not None:
            model.use_draft_vocab(mx.array(draft_vocab.read(shortlist, cfg.vocab_size)))
    return model


def load(path: str | Path, dtype: mx.Dtype | None = None, verify: bool = False):
    """(model, tokenizer) from a local model directory, an iPhone bundle (see `load_model`
    for `verify`), or "micro"."""
    from mlxkit.tokenizer import load_tokenizer

    model = load_model(path, dtype, verify=verify)
    return model, load_tokenizer(resolve_model_dir(path))
