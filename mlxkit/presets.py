"""The published Qwen 3.5 small configs (the `text_config` of config.json in the Hugging Face
repositories of HUB_REPOS), so that the planner, the synthetic-checkpoint maker and `--size`
work without downloading anything.

The vision towers' shapes (depth, hidden, MLP, heads) are inferred from the published parameter
counts — 0.8B 100.6M, 2B 331.4M, 4B 333.5M, 9B 456.0M, which these shapes reproduce (a test
checks it) — not read from the released config files."""

from __future__ import annotations

import copy

HUB_REPOS = {
    "0.8b": "Qwen/Qwen3.5-0.8B",
    "2b": "Qwen/Qwen3.5-2B",
    "4b": "Qwen/Qwen3.5-4B",
    "9b": "Qwen/Qwen3.5-9B",
}

_SHARED = {
    "model_type": "qwen3_5_text",
    "head_dim": 256,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "vocab_size": 248320,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attn_output_gate": True,
    "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False,
    "hidden_act": "silu",
    "eos_token_id": 248044,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10_000_000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
}

# size: (hidden, layers, intermediate, q heads, kv heads, linear v heads, tied)
_SIZES = {
    "0.8b": (1024, 24, 3584, 8, 2, 16, True),
    "2b": (2048, 24, 6144, 8, 2, 16, True),
    "4b": (2560, 32, 9216, 16, 4, 32, True),
    "9b": (4096, 32, 12288, 16, 4, 32, False),
}


def text_config(size: str) -> dict:
    """The `text_config` of a published size, as it appears in that checkpoint's config.json."""
    from mlxkit.errors import ConfigError

    if size not in _SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of {', '.join(_SIZES)}")
    hidden, layers, inter, heads, kv_heads, v_heads, tied = _SIZES[size]
    cfg = copy.deepcopy(_SHARED)
    cfg.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        linear_num_value_heads=v_heads,
        tie_word_embeddings=tied,
        layer_types=[
            "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)
        ],
    )
    return cfg


# size: (depth, hidden, intermediate, heads); out_hidden_size is the text hidden size
_VISION = {
    "0.8b": (12, 768, 3072, 12),
    "2b": (24, 1024, 4096, 16),
    "4b": (24, 1024, 4096, 16),
    "9b": (27, 1152, 4304, 16),
}
# Token ids of the vision path in the published config.json (the real tokenizer's).
VISION_TOKEN_IDS = {
    "image_token_id": 248056,
    "video_token_id": 248057,
    "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
}


def vision_config(size: str) -> dict:
    """The `vision_config` of a published size, as in that checkpoint's config.json."""
    text = text_config(size)
    depth, hidden, inter, heads = _VISION[size]
    return {
        "model_type": "qwen3_5_vision",
        "depth": depth,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_heads": heads,
        "out_hidden_size": text["hidden_size"],
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
        "hidden_act": "gelu_pytorch_tanh",
        "deepstack_visual_indexes": [],
        "initializer_range": 0.02,
    }


def model_config(size: str) -> dict:
    """The outer `qwen3_5` config.json of a published size: text and vision configs, token ids."""
    text = text_config(size)
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": vision_config(size),
        "tie_word_embeddings": text["tie_word_embeddings"],
        **VISION_TOKEN_IDS,
    }


def sizes() -> list[str]:
    return list(_SIZES)
