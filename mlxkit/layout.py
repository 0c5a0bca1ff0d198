"""What a conversion writes, computed from the config alone.

`planned_tensors` lists every output tensor with its exact shape, dtype and byte size. It
derives them from the model's own parameter tree (instantiating `Model(cfg)` is free: MLX
parameters are lazy, so nothing is allocated) and from `Recipe.rule_for`, never from
weights. The iPhone planner budgets memory with it; the writer lays out its shards with
it; a test checks that a real conversion writes exactly this list. It lives in the core
package because both the converter and the planner need it, and neither should import the
other: a recipe comes in as anything with `rule_for` (the converter's `Recipe`).

The vision tower (part "vision") is never quantized by the recipe: it is written in the output
dtype unless `vision_bits` asks for its linear layers to be quantized (`vision_rule`).
`ModelConfig` is a checkpoint's shapes — text model and vision tower — as read from config.json,
with the checks that tie the two together; `checkpoint_tensor` is the one mapping from a Hugging
Face tensor name to the model's parameter path, shared by the converter and the loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.errors import ConfigError
from mlxkit.models.qwen3_5 import Model, TextConfig, sanitize_tensor
from mlxkit.models.qwen3_5_vision import VisionConfig, sanitize_vision_tensor

Part = Literal["embeddings", "layers", "mtp", "vision"]

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4}
OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
KEPT_FLOAT32 = ("A_log",)  # stays float32 whatever --dtype says (mlx-lm does the same)
VISION_GROUP_SIZE = 64  # of a quantized vision tower when no recipe gives one
# Tried in turn, largest first, where the asked group size does not divide a weight's input
# width (mx.quantize takes 32, 64 and 128, and a multiple of 128 is one of 64).
FALLBACK_GROUP_SIZES = (64, 32)
VISION_TOKEN_KEYS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint's shapes from its config.json: the text model and the vision tower it
    declares (None: text only). Whether the weights hold that tower is the loader's and the
    converter's business; the planner needs only this."""

    text: TextConfig
    vision: VisionConfig | None = None

    @classmethod
    def from_dict(cls, config: dict) -> ModelConfig:
        """Parses both configs; a vision tower must feed the text model's width and come with
        the four vision token ids, each inside the vocabulary (without them mlx-vlm and MLX
        Swift fall back to wrong ids and every position after an image shifts)."""
        text = TextConfig.from_dict(config)
        if not config.get("vision_config"):
            return cls(text)
        vision = VisionConfig.from_dict(config)
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size {vision.out_hidden_size} differs from the text "
                f"model's hidden_size {text.hidden_size}"
            )
        missing = [k for k in VISION_TOKEN_KEYS if k not in config]
        if missing:
            raise ConfigError(f"config.json has a vision_config but lacks {', '.join(missing)}")
        for key in VISION_TOKEN_KEYS:
            value = config[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (0 <= value < text.vocab_size)
            ):
                raise ConfigError(
                    f"config.json: {key} must be a token id below the vocabulary size "
                    f"{text.vocab_size} (got {value!r})"
                )
        if len({config[k] for k in VISION_TOKEN_KEYS}) < len(VISION_TOKEN_KEYS):
            raise ConfigError(
                f"config.json: {', '.join(VISION_TOKEN_KEYS)} must be four different tokens"
            )
        taken = {e: "eos_token_id" for e in text.eos_token_id}
        pad = config.get("pad_token_id")
        if isinstance(pad, int) and not isinstance(pad, bool):
            taken.setdefault(pad, "pad_token_id")
        for key in VISION_TOKEN_KEYS:
            if config[key] in taken:
                raise ConfigError(
                    f"config.json: {key} {config[key]} is also the {taken[config[key]]}; the "
                    "vision tokens need ids of their own"
                )
        return cls(text, vision)

    def without_vision(self) -> ModelConfig:
        return replace(self, vision=None)


class QuantizationRules(Protocol):
    """What the layout needs of a recipe: (bits, group size) per weight, or None; its default
    group size (a quantized vision tower takes it)."""

    group_size: int

    def rule_for(self, path: str, shape: tuple[int, ...]) -> tuple[int, int] | None: ...


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output. `path` is the model's parameter path; tensors of part
    "mtp" are stored in OUT/mtp/ without their `mtp.` prefix (see `drafter_key`)."""

    path: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16", "float16", "float32" or "uint32" (packed quantized weights)
    part: Part

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def checkpoint_tensor(
    name: str, value: mx.array, tie_word_embeddings: bool, dtype: mx.Dtype | None, vision: bool
) -> tuple[str, mx.array] | None:
    """A Hugging Face checkpoint tensor as (parameter path, array in our layout), or None when
    the model has no such parameter (a tied lm_head; the vision tower when `vision` is off)."""
    item = sanitize_tensor(name, value, tie_word_embeddings, dtype)
    if item is None and vision:
        item = sanitize_vision_tensor(name, value, dtype)
    return item


def part_of(path: str) -> Part:
    if path.startswith("mtp."):
        return "mtp"
    if path.startswith(("language_model.model.embed_tokens.", "language_model.lm_head.")):
        return "embeddings"
    if path.startswith(("vision_tower.", "model.visual.")):
        return "vision"
    return "layers"


def drafter_key(path: str) -> str:
    """The tensor name inside OUT/mtp/: mlx-vlm's `qwen3_5_mtp` drafter adds 1 to the norms
    of `mtp.`-prefixed names (it takes them for the raw Hugging Face layout), so converted
    tensors must be stored without the prefix, as mlx-vlm's own splitter writes them."""
    return path.removeprefix("mtp.")


def output_dtype(path: str, dtype: str) -> str:
    return "float32" if path.rsplit(".", 1)[-1] in KEPT_FLOAT32 else dtype


def quantized_shapes(
    shape: tuple[int, ...], bits: int, group_size: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (packed uint32 weight, scales/biases) that `mx.quantize` returns."""
    rows, cols = shape
    return (rows, cols * bits // 32), (rows, cols // group_size)


def model_parameters(
    cfg: TextConfig, include_mtp: bool = True, vision: VisionConfig | None = None
) -> list[tuple[str, tuple]]:
    """(parameter path, shape) of the unquantized model, in the order the writer goes: the
    text model, the MTP head, then the vision tower. Building the (lazy) module to list them
    takes tens of milliseconds and the planner asks hundreds of times per table, so the
    answer is kept per configuration (TextConfig is mutable, hence keyed by its repr)."""
    key = (repr(cfg), include_mtp, vision)
    if key not in _PARAMETERS:
        model = Model(cfg, has_mtp=include_mtp, vision=vision)
        _PARAMETERS[key] = tuple(
            (path, tuple(p.shape)) for path, p in tree_flatten(model.parameters())
        )
    return list(_PARAMETERS[key])


_PARAMETERS: dict[tuple, tuple[tuple[str, tuple], ...]] = {}


def fitting_group_size(width: int, group_size: int) -> int | None:
    """The group size to quantize a weight of this input width with: `group_size` when it
    divides the width, else the largest of FALLBACK_GROUP_SIZES that does (written per layer
    in config.json, as mlx-lm does), None when none does. Groups run along the input axis, so
    a width no group size divides cannot be quantized by MLX at all."""
    return next((g for g in (group_size, *FALLBACK_GROUP_SIZES) if width % g == 0), None)


def vision_rule(
    path: str, shape: tuple[int, ...], bits: int | None, group_size: int
) -> tuple[int, int] | None:
    """(bits, group size) for a vision-tower weight, or None (kept in the output dtype, the
    default). Only the linear layers are quantized: the Conv3d patch embedding is 5-D, and the
    position table stays whole because mlx-swift-lm reads `pos_embed.weight`'s dtype to weight
    its interpolation (Qwen3VL.swift, `positionalEmbeddings`), which a packed table breaks.
    The group size is `fitting_group_size`'s. Unlike a text weight (which the recipe refuses),
    a linear whose input width no group size divides stays in the output dtype: the 9B
    tower's MLP takes 4,304 features, so refusing would rule out --vision-bits for it; loaders
    see such a layer unquantized because it has no `.scales`."""
    if bits is None or len(shape) != 2 or path.removesuffix(".weight").endswith("pos_embed"):
        return None
    group = fitting_group_size(shape[-1], group_size)
    return None if group is None else (bits, group)


def weight_rule(
    path: str,
    shape: tuple[int, ...],
    recipe: QuantizationRules | None,
    vision_bits: int | None = None,
) -> tuple[int, int] | None:
    """The one decision of how a weight is stored, for the layout and the writer alike: the
    recipe's rule for text and MTP weights, `vision_rule` for the vision tower."""
    if part_of(path) == "vision":
        group_size = recipe.group_size if recipe is not None else VISION_GROUP_SIZE
        return vision_rule(path, shape, vision_bits, group_size)
    return recipe.rule_for(path, shape) if recipe is not None else None


def planned_tensors(
    cfg: TextConfig,
    recipe: QuantizationRules | None,
    include_mtp: bool = True,
    dtype: str = "bfloat16",
    vision: VisionConfig | None = None,
    vision_bits: int | None = None,
) -> list[PlannedTensor]:
    """Every tensor the writer will write, in writing order. `recipe` None means no
    quantization; `dtype` is the output dtype of everything not quantized (and of the
    scales and biases of what is). Quantized weights expand to `.weight` (uint32, packed),
    `.scales` and `.biases`. `vision` adds the vision tower (quantized only with
    `vision_bits`)."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    planned = []
    include_mtp = include_mtp and cfg.mtp_num_hidden_layers > 0
    for path, shape in model_parameters(cfg, include_mtp, vision):
        part = part_of(path)
        rule = weight_rule(path, shape, recipe, vision_bits)
        if rule is None:
            planned.append(PlannedTensor(path, shape, output_dtype(path, dtype), part))
            continue
        w_shape, s_shape = quantized_shapes(shape, *rule)
        module = path[: -len(".weight")]
        planned.append(PlannedTensor(path, w_shape, "uint32", part))
        planned.append(PlannedTensor(f"{module}.scales", s_shape, dtype, part))
        planned.append(PlannedTensor(f"{module}.biases", s_shape, dtype, part))
    return planned


def bytes_by_part(tensors: list[PlannedTensor]) -> dict[str, int]:
    totals = {"embeddings": 0, "layers": 0, "mtp": 0, "vision": 0}
    for t in tensors:
        totals[t.part] += t.nbytes
    return totals


def bytes_by_part_on_disk(model_dir: Path, drafter_dir: Path | None = None) -> dict[str, int]:
    """Tensor bytes per part as the safetensors headers of a written model directory say,
    the drafter directory's tensors (stored without their `mtp.` prefix) counting as "mtp":
    what `bytes_by_part(planned_tensors(...))` must equal after a conversion."""
    totals = bytes_by_part([])
    for name, info in read_headers(weight_files(model_dir)).items():
        totals[part_of(name)] += info.nbytes
    if drafter_dir is not None:
        totals["mtp"] += sum(i.nbytes for i in read_headers(weight_files(drafter_dir)).values())
    return totals
