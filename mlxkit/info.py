"""`mlxkit info`: what a checkpoint holds, read from config.json and the safetensors headers
alone (no weights are loaded, so it is instant even for a 9B)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlxkit.checkpoint import (
    TensorInfo,
    model_subdir,
    quantization_block,
    read_config,
    read_headers,
    weight_files,
)
from mlxkit.load import MTP_DIR, load_config, load_model_config, resolve_model_dir
from mlxkit.quality import model_rounding

PARTS = ("text", "mtp", "vision")


@dataclass
class CheckpointInfo:
    path: Path
    model_type: str
    layout: str  # "hugging face" or "mlx"
    summary: dict
    quantization: dict | None
    # (bits, group size) -> how many of the text model's quantized modules hold it (an `auto`
    # or mixed recipe gives several), and how the weights were rounded (`convert --rounding`)
    settings: dict[tuple, int] = field(default_factory=dict)
    rounding: str = "nearest"
    params: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    nbytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))


def _part(name: str) -> str:
    if name.startswith(("mtp.", MTP_DIR + "/")):
        return "mtp"
    if name.startswith(("model.visual.", "vision_tower.")):
        return "vision"
    return "text"


def _module_path(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _param_count(t: TensorInfo, bits: int | None) -> int:
    """Elements of the original weight: a packed uint32 holds 32 / bits values; scales and
    biases of a quantized layer are not parameters."""
    n = 1
    for d in t.shape:
        n *= d
    if bits is None:
        return n
    if t.name.endswith((".scales", ".biases")):
        return 0
    return n * 32 // bits if t.dtype == "U32" else n


def _setting(module: str, quant: dict) -> tuple[int | None, int | None]:
    """(bits, group size) of a quantized module: its own entry's, else the block's defaults."""
    override = quant.get(module)
    override = override if isinstance(override, dict) else {}
    return (
        override.get("bits", quant.get("bits")),
        override.get("group_size", quant.get("group_size")),
    )


def _bits_for(name: str, quant: dict, quantized_modules: set[str]) -> int | None:
    module = _module_path(name)
    return _setting(module, quant)[0] if module in quantized_modules else None


def _settings(tensors: dict[str, TensorInfo], quant: dict) -> dict[tuple, int]:
    """How many of the text model's quantized modules hold each setting, commonest first."""
    counts: dict[tuple, int] = {}
    for name in tensors:
        if name.endswith(".scales") and _part(name) == "text":
            key = _setting(_module_path(name), quant)
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def _add(
    info: CheckpointInfo, tensors: dict[str, TensorInfo], quant: dict, prefix: str = ""
) -> None:
    quantized = {_module_path(n) for n in tensors if n.endswith(".scales")}
    for name, t in tensors.items():
        part = _part(prefix + name)
        info.params[part] += _param_count(t, _bits_for(name, quant, quantized))
        info.nbytes[part] += t.nbytes


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    model_dir = resolve_model_dir(path)
    config = read_config(model_dir)
    cfg = load_config(model_dir)
    tensors = read_headers(weight_files(model_dir))
    quant = quantization_block(config, str(model_dir / "config.json"))
    n_linear = sum(cfg.is_linear(i) for i in range(cfg.num_hidden_layers))
    info = CheckpointInfo(
        path=model_dir,
        model_type=config["model_type"],
        layout="hugging face"
        if any(n.startswith("model.language_model.") for n in tensors)
        else "mlx",
        summary={
            "layers": f"{cfg.num_hidden_layers} ({n_linear} Gated-DeltaNet, "
            f"{cfg.num_hidden_layers - n_linear} full attention)",
            "hidden size": cfg.hidden_size,
            "intermediate size": cfg.intermediate_size,
            "attention heads (q / kv)": f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}, "
            f"head dim {cfg.head_dim}",
            "linear-attention heads (k / v)": f"{cfg.linear_num_key_heads} / "
            f"{cfg.linear_num_value_heads}",
            "vocabulary": cfg.vocab_size,
            "tied embeddings": cfg.tie_word_embeddings,
            "MTP layers": cfg.mtp_num_hidden_layers,
            "max context": cfg.max_position_embeddings,
        },
        quantization={k: v for k, v in quant.items() if k in ("bits", "group_size", "mode")}
        or None,
    )
    vision = _vision_summary(model_dir, config)
    if vision:
        info.summary["image encoder (vision tower)"] = vision
    _add(info, tensors, quant)
    if info.quantization:
        info.settings = _settings(tensors, quant)
        info.rounding = model_rounding(model_dir)
    drafter = model_subdir(model_dir, MTP_DIR)  # a link out of the model is refused
    if drafter is not None:
        mtp_quant = quantization_block(read_config(drafter), str(drafter / "config.json"))
        _add(info, read_headers(weight_files(drafter)), mtp_quant, prefix=MTP_DIR + "/")
    return info


def _vision_summary(model_dir: Path, config: dict) -> str | None:
    """The vision tower config.json declares, in one line (None when it declares none)."""
    v = load_model_config(model_dir).vision
    if v is None:
        return None
    ids = "/".join(
        str(config[k])
        for k in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
        )
    )
    return (
        f"depth {v.depth}, hidden {v.hidden_size}, {v.num_heads} heads (head dim {v.head_dim}), "
        f"patch {v.patch_size}, merge {v.spatial_merge_size}, out {v.out_hidden_size}; "
        f"image/video/start/end token ids {ids}"
    )


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _quantization_line(info: CheckpointInfo) -> str:
    """Every setting the text model's linears hold (a mixed or `auto` recipe has several) and
    the text model's bits per weight, scales and biases counted as mlx-lm counts them."""

    def setting(key: tuple) -> str:
        bits, group = key
        return f"{bits}-bit, group size {group}"

    if len(info.settings) <= 1:
        q = info.quantization or {}
        line = setting(next(iter(info.settings), (q.get("bits"), q.get("group_size"))))
    else:
        parts = [f"{setting(k)} ({n} module{'s' * (n != 1)})" for k, n in info.settings.items()]
        line = "mixed: " + "; ".join(parts)
    if info.params["text"]:
        line += f"; {info.nbytes['text'] * 8 / info.params['text']:.2f} bits per weight (text)"
    if info.rounding != "nearest":
        line += f"; rounding {info.rounding}"
    return line


def format_info(info: CheckpointInfo) -> str:
    lines = [f"{info.path}", f"  model type: {info.model_type} ({info.layout} layout)"]
    lines += [f"  {k}: {v}" for k, v in info.summary.items()]
    if info.quantization:
        lines.append(f"  quantization: {_quantization_line(info)}")
    lines.append("  parameters and bytes by part:")
    for part in PARTS:
        lines.append(
            f"    {part:<7} {info.params[part]:>15,} ({human_count(info.params[part]):>8})"
            f"  {info.nbytes[part]:>15,} bytes ({human_bytes(info.nbytes[part])})"
        )
    total_p, total_b = sum(info.params.values()), sum(info.nbytes.values())
    lines.append(
        f"    {'total':<7} {total_p:>15,} ({human_count(total_p):>8})"
        f"  {total_b:>15,} bytes ({human_bytes(total_b)})"
    )
    return "\n".join(lines)
