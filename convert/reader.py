"""The source checkpoint, checked up front and read in row chunks.

`SourceCheckpoint.open` validates everything that can be validated without reading
weights — config.json, every shard header (via `mlxkit.checkpoint`), that each model
parameter has exactly one source tensor of a floating dtype, and that its shape after
`checkpoint_tensor` is the model's — so a bad checkpoint fails before a byte is written. The
vision tower counts as part of the model when config.json declares it, the weights hold it
and it is wanted; its preprocessor configs are checked against it then too.

`read_rows` maps only the byte range of the rows it is asked for and unmaps it before
returning, so resident memory stays at one chunk however large the tensor or shard is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxkit.checkpoint import (
    TensorInfo,
    check_vision_token_ids,
    read_config,
    read_headers,
    weight_files,
)
from mlxkit.errors import CheckpointError, ConfigError
from mlxkit.layout import ModelConfig, checkpoint_tensor, model_parameters
from mlxkit.models.qwen3_5 import TextConfig, hf_name_to_mlx
from mlxkit.models.qwen3_5_vision import HF_PREFIX as VISION_HF_PREFIX
from mlxkit.models.qwen3_5_vision import PREFIX as VISION_PREFIX
from mlxkit.models.qwen3_5_vision import VisionConfig

# safetensors dtype -> (numpy dtype holding the bytes, mlx dtype they mean)
SOURCE_DTYPES = {
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
}


@dataclass
class SourceCheckpoint:
    directory: Path
    config: dict  # config.json as published (outer `qwen3_5` or bare `qwen3_5_text`)
    cfg: TextConfig
    tensors: dict[str, TensorInfo]  # our parameter path -> where its source bytes are
    has_mtp: bool  # the MTP head is present (and wanted)
    vision: VisionConfig | None = None  # the vision tower, when present (and wanted)

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def shapes(self) -> ModelConfig:
        """What is converted: the text model and the vision tower if kept."""
        return ModelConfig(self.cfg, self.vision)

    @classmethod
    def open(
        cls, directory: Path, include_mtp: bool = True, include_vision: bool = True
    ) -> SourceCheckpoint:
        config = read_config(directory)
        try:
            if include_vision:
                shapes = ModelConfig.from_dict(config)
            else:
                shapes = ModelConfig(TextConfig.from_dict(config))
        except ConfigError as e:
            raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
        cfg = shapes.text
        headers = read_headers(weight_files(directory))
        if not any(name.startswith("model.language_model.") for name in headers):
            raise CheckpointError(
                f"{directory}: no model.language_model.* tensors; this is not a Qwen 3.5 "
                "checkpoint in the Hugging Face layout (already converted to MLX?)"
            )
        has_mtp = (
            include_mtp
            and cfg.mtp_num_hidden_layers > 0
            and any(n.startswith("mtp.") for n in headers)
        )
        vision = shapes.vision
        if not any(n.startswith(VISION_HF_PREFIX) for n in headers):
            vision = None  # declared but not shipped: a text-only checkpoint
        if vision is not None:
            check_vision_token_ids(directory, config)
            _check_preprocessor(directory, vision)
        expected = dict(model_parameters(cfg, include_mtp=has_mtp, vision=vision))
        tensors: dict[str, TensorInfo] = {}
        for name, info in headers.items():
            path = hf_name_to_mlx(name, cfg.tie_word_embeddings)
            if vision is not None and name.startswith(VISION_HF_PREFIX):
                path = VISION_PREFIX + name[len(VISION_HF_PREFIX) :]
            if path is None or (path.startswith("mtp.") and not has_mtp):
                continue  # an unwanted vision tower, a tied lm_head, or an unwanted MTP head
            where = f"{info.file}: tensor {name}"
            if path not in expected:
                raise CheckpointError(f"{where} is not a Qwen 3.5 text-model tensor")
            if info.dtype not in SOURCE_DTYPES:
                raise CheckpointError(
                    f"{where} has dtype {info.dtype}; expected bf16, f16 or f32 weights"
                )
            shape = _sanitized_shape(name, info, cfg, vision is not None)
            if shape != expected[path]:
                raise CheckpointError(
                    f"{where} has shape {info.shape}, expected {expected[path]} from config.json"
                )
            tensors[path] = info
        for path in expected:
            if path not in tensors:
                raise CheckpointError(
                    f"{directory}: missing tensor for {path} (the checkpoint has no such "
                    "weight; incomplete download?)"
                )
        return cls(directory, config, cfg, tensors, has_mtp, vision)


def _check_preprocessor(directory: Path, vision: VisionConfig) -> None:
    """The checkpoint's preprocessor configs, where present, readable and consistent with the
    tower (patch, temporal patch and merge sizes); absent ones mean Qwen 3.5's defaults."""
    from mlxkit.vision import Preprocessor

    Preprocessor.from_dir(directory, vision)


def _sanitized_shape(name: str, info: TensorInfo, cfg: TextConfig, vision: bool) -> tuple[int, ...]:
    """The shape `checkpoint_tensor` turns this tensor into, found by running it on a lazy
    array of the source shape (never evaluated, so nothing is allocated): the conv1d axis
    swap, the Conv3d patch weight's and any future layout quirk stay defined in one place."""
    lazy = mx.zeros(info.shape, dtype=SOURCE_DTYPES[info.dtype][1])
    item = checkpoint_tensor(name, lazy, cfg.tie_word_embeddings, None, vision)
    return tuple(item[1].shape) if item is not None else info.shape


def row_bytes(info: TensorInfo) -> int:
    return info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes


def row_chunks(info: TensorInfo, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_bytes` source bytes each (at least one row)."""
    if not info.shape:
        return [(0, 1)]
    rows = info.shape[0]
    step = max(1, max_bytes // max(1, row_bytes(info)))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def read_rows(info: TensorInfo, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of a tensor as an mx.array in its stored dtype."""
    return as_stored_dtype(info, read_raw_rows(info, start, stop))


def read_raw_rows(info: TensorInfo, start: int, stop: int) -> mx.array:
    """The bytes of rows [start, stop), copied into MLX memory as their numpy carrier dtype
    (uint16 for bf16). Creates no MLX operation, so it may run on any thread. The file is
    memory-mapped for this range only, and unmapped when the copy is done."""
    np_dtype = SOURCE_DTYPES[info.dtype][0]
    shape = (stop - start, *info.shape[1:]) if info.shape else ()
    count = math.prod(shape)
    if count == 0:
        return mx.array(np.zeros(shape, dtype=np_dtype))
    offset = info.start + start * row_bytes(info)
    # The map is unreferenced (hence unmapped) as soon as this statement is done.
    return mx.array(
        np.memmap(info.file, dtype=np_dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)
    )


def as_stored_dtype(info: TensorInfo, raw: mx.array) -> mx.array:
    mx_dtype = SOURCE_DTYPES[info.dtype][1]
    return raw.view(mx_dtype) if raw.dtype != mx_dtype else raw
