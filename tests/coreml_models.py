"""Vision towers for the Core ML tests: small random checkpoints written in both weight
layouts, and transformers' Qwen 3.5 vision model run in float64 as the reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
from safetensors.torch import save_file

from mlxkit.checkpoint import read_headers, weight_files
from tests.make_fixtures import Float64Everywhere

# the per-grid constants of an exported function (GridEncoder's buffers)
ROTARY_TABLES = ("cos_rows", "sin_rows", "cos_cols", "sin_cols")


def write_vision_checkpoint(out: Path, vision_config: dict, seed: int) -> Path:
    """config.json + model.safetensors holding only `model.visual.*` (bf16), with weights
    scaled so that activations are O(1) and attention is far from uniform. A tower needs
    nothing else from a checkpoint."""
    from transformers import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    rng = np.random.default_rng(seed)
    vision_config = {k: v for k, v in vision_config.items() if k != "model_type"}
    with torch.device("meta"):
        model = Qwen3_5VisionModel(Qwen3_5VisionConfig(**vision_config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            value = 1 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 0.2 * rng.standard_normal(shape)
        elif name == "pos_embed.weight":
            value = rng.standard_normal(shape)
        else:
            value = 1.5 * rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        tensors[f"model.visual.{name}"] = torch.tensor(value, dtype=torch.bfloat16)
    out.mkdir(parents=True)
    config = {
        "model_type": "qwen3_5",
        "vision_config": {"model_type": "qwen3_5_vision", **vision_config},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, out / "model.safetensors")
    return out


def write_converted_layout(src: Path, out: Path) -> Path:
    """The same tower as mlx-vlm (and mlxkit's converter) store it: `vision_tower.*`, the
    patch-embedding weight channels-last, by mlxkit's own `sanitize_vision_tensor`."""
    import mlx.core as mx

    from mlxkit.models.qwen3_5_vision import sanitize_vision_tensor

    tensors = {}
    for file in weight_files(src):
        for name, value in mx.load(str(file)).items():
            item = sanitize_vision_tensor(name, value)
            if item is not None:
                tensors[item[0]] = item[1]
    out.mkdir(parents=True)
    (out / "config.json").write_text((src / "config.json").read_text())
    mx.save_safetensors(str(out / "model.safetensors"), tensors)
    return out


def hf_vision_weights(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in weight_files(model_dir):
        names = [n for n in read_headers([file]) if n.startswith("model.visual.")]
        with safe_open(file, framework="pt") as f:
            out.update({n.removeprefix("model.visual."): f.get_tensor(n).to(dtype) for n in names})
    return out


class Reference:
    """transformers' Qwen3_5VisionModel on a checkpoint's vision weights, truly in float64:
    every float32 it asks for (rotary angles, interpolation weights, softmax) is float64."""

    def __init__(self, model_dir: Path):
        from transformers import Qwen3_5VisionConfig
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

        vc = dict(json.loads((model_dir / "config.json").read_text())["vision_config"])
        vc.pop("model_type", None)
        config = Qwen3_5VisionConfig(**vc)
        config._attn_implementation = "eager"
        self.model = Qwen3_5VisionModel(config).double().eval()
        missing = self.model.load_state_dict(
            hf_vision_weights(model_dir, torch.float64), strict=False
        )
        assert not missing.unexpected_keys and set(missing.missing_keys) <= {
            "rotary_pos_emb.inv_freq",
            "rotary_pos_emb.original_inv_freq",
        }, missing
        rot = self.model.rotary_pos_emb
        half = config.hidden_size // config.num_heads // 2
        theta = config.rope_parameters["rope_theta"]
        rot.inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)

    def __call__(self, patches: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        with torch.no_grad(), Float64Everywhere() as mode:
            out = self.model(
                torch.from_numpy(np.asarray(patches, np.float64)),
                grid_thw=torch.tensor([[1, *grid]]),
            ).pooler_output
        assert not mode.low_precision_ops, mode.low_precision_ops
        return out.numpy()


def random_patches(grid: tuple[int, int], patch_dim: int, seed: int) -> np.ndarray:
    """Normalized pixels (mean and std 0.5, so in [-1, 1]) of one image, flattened."""
    return np.random.default_rng(seed).uniform(-1, 1, (grid[0] * grid[1], patch_dim))


def errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, the smallest cosine between an output token and its
    reference)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    return rel, float(cos.min())


def blob_consts(spec) -> dict[str, dict[str, tuple[str, int, int, int]]]:
    """function -> const name -> (file, offset, elements, bytes per element) of every const
    stored in the weight file."""
    itemsize = {ct.proto.MIL_pb2.FLOAT16: 2, ct.proto.MIL_pb2.FLOAT32: 4}
    out = {}
    for fname, f in spec.mlProgram.functions.items():
        (block,) = f.block_specializations.values()
        out[fname] = {}
        for op in block.operations:
            if op.type != "const" or op.attributes["val"].WhichOneof("value") != "blobFileValue":
                continue
            blob = op.attributes["val"].blobFileValue
            tensor = op.outputs[0].type.tensorType
            count = math.prod(d.constant.size for d in tensor.dimensions)
            out[fname][op.outputs[0].name] = (
                blob.fileName,
                blob.offset,
                count,
                itemsize[tensor.dataType],
            )
    return out


def file_end(consts) -> int:
    """Where the last blob ends: each blob is 64 bytes of metadata at its offset, then data
    (blobs start on 64-byte boundaries after a 64-byte file header)."""
    return max(offset + 64 + n * size for c in consts.values() for _, offset, n, size in c.values())
