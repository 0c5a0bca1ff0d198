"""What a conversion writes, computed from the config alone.

`planned_tensors` lists every output tensor with its exact shape, dtype and byte size. It
derives them from the model's own parameter tree (instantiating `Model(cfg)` is free: MLX
parameters are lazy, so nothing is allocated) and from `Recipe.rule_for`, never from
weights. The iPhone planner budgets memory with it; the writer lays out its shards with
it; a test checks that a real conversion writes exactly this list. It lives in the core
package because both the converter and the planner need it, and neither should import the
other: a recipe comes in as anything with `rule_for` (the converter's `Recipe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from mlx.utils import tree_flatten

from mlxkit.checkpoint import read_headers, weight_files
from mlxkit.models.qwen3_5 import Model, TextConfig

Part = Literal["embeddings", "layers", "mtp", "vision"]

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4}
OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
KEPT_FLOAT32 = ("A_log",)  # stays float32 whatever --dtype says (mlx-lm does the same)


class QuantizationRules(Protocol):
    """What the layout needs of a recipe: (bits, group size) per weight, or None."""

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


def model_parameters(cfg: TextConfig, include_mtp: bool = True) -> list[tuple[str, tuple]]:
    """(parameter path, shape) of the unquantized model, in the order the writer goes."""
    model = Model(cfg, has_mtp=include_mtp)
    return [(path, tuple(p.shape)) for path, p in tree_flatten(model.parameters())]


def planned_tensors(
    cfg: TextConfig,
    recipe: QuantizationRules | None,
    include_mtp: bool = True,
    dtype: str = "bfloat16",
) -> list[PlannedTensor]:
    """Every tensor the writer will write, in writing order. `recipe` None means no
    quantization; `dtype` is the output dtype of everything not quantized (and of the
    scales and biases of what is). Quantized weights expand to `.weight` (uint32, packed),
    `.scales` and `.biases`."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    planned = []
    for path, shape in model_parameters(cfg, include_mtp and cfg.mtp_num_hidden_layers > 0):
        part = part_of(path)
        rule = recipe.rule_for(path, shape) if recipe is not None else None
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
