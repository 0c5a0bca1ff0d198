"""Regenerate the tiny Qwen 3.5 test fixtures in tests/fixtures/.

Run from the repository root:

    python tests/make_fixtures.py

Needs torch and transformers (the `dev` extra); the test suite itself does not.
Everything is derived from fixed seeds, so a rerun with the same library versions
rewrites byte-identical weights and references.

Two fixtures are written, each a directory in the real Hugging Face on-disk layout of
a Qwen 3.5 checkpoint (outer `qwen3_5` config with `text_config` and `vision_config`,
`model.language_model.*` / `model.visual.*` / `mtp.*` tensors, bf16 except
`linear_attn.A_log` and `linear_attn.norm.weight` in float32):

* ``tiny_tied``   -- 4 layers, tied embeddings, one ``model.safetensors``.
* ``tiny_untied`` -- 8 layers, ``lm_head.weight``, two shards plus an index.

Each directory also holds a small byte-level BPE tokenizer (made by
``mlxkit.tokenizer_build.train_bpe_tokenizer``) and ``reference.npz`` with logits and
hidden states from transformers (float64 and float32) and from an independent numpy
implementation of the MTP head.  See tests/fixtures/README.md for the array meanings.

The float64 transformers run is float64 throughout: transformers' Qwen 3.5 code casts
to float32 in several places (RMSNorm ``x.float()``, the gated norm, the gated delta
rule kernels, softmax, the rotary frequencies).  A torch dispatch mode rewrites every
requested float32 dtype to float64 during that run, and the script asserts that no
op produced a tensor in a lower precision.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

SEED = 35_2026
PROMPT_LEN = 12
DECODE_STEPS = 10
BPE_VOCAB = 440  # BPE tokens; the 33 Qwen special tokens come after them (473 <= 512)
VOCAB_SIZE = 512  # embedding rows; ids past the tokenizer are padding, as in the real models

SPECS = {
    "tiny_tied": {"num_hidden_layers": 4, "tie": True, "shards": 1, "seed": SEED + 1},
    "tiny_untied": {"num_hidden_layers": 8, "tie": False, "shards": 2, "seed": SEED + 2},
}

FLOAT32_TENSORS = ("linear_attn.A_log", "linear_attn.norm.weight")
# RMSNorms that compute x * (1 + w) (weights stored near 0)
ONE_PLUS_W_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
    "model.language_model.norm.weight",
    "mtp.norm.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
)

# A fixed corpus for the tokenizer, so the result never depends on the machine.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    (
        "Qwen 3.5 mixes Gated DeltaNet layers with gated full attention: three linear "
        "attention layers, then one full attention layer, repeated through the model."
    ),
    (
        "A multi-token prediction head drafts the next token from the hidden state and the "
        "embedding of the token that follows; the main model then verifies the draft."
    ),
    (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a\n\n\nprint([fibonacci(i) for i in range(10)])\n"
    ),
    (
        "class Cache:\n    def __init__(self, size: int) -> None:\n        self.size = size\n"
        "        self.keys = []\n        self.values = []\n\n    def trim(self, n: int) -> int:\n"
        "        n = min(n, len(self.keys))\n        del self.keys[-n:]\n        return n\n"
    ),
    (
        "import numpy as np\nx = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
        "print(x.mean(axis=0), x.std(axis=1))\n"
    ),
    "Hello! How are you today? I am fine, thank you. What would you like to talk about?",
    "Please summarise the following text in one sentence, then list three key points.",
    "Weights are stored in bfloat16; the decay parameters A_log stay in float32.",
    "On an iPhone the app must check the available memory at run time before loading.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -42 1e-6 0x1F 2026-01-01",
    (
        "Accents and other scripts: café naïve résumé Straße Ångström 你好，世界 こんにちは "
        "Привет мир مرحبا 🙂 ✓ → ∑ π"
    ),
    'JSON: {"model_type": "qwen3_5", "hidden_size": 64, "tie_word_embeddings": true}',
    "<think>\nThe user wants a short answer.\n</think>\n\nSure, here is a short answer.",
    (
        "Once upon a time there was a small model that lived in a test directory. Every "
        "day it produced the same logits, and every day the tests were happy about it."
    ),
    (
        "Speculative decoding keeps the recurrent state after each verified position and "
        "rolls back to the last accepted token; attention caches are trimmed instead."
    ),
]


# --------------------------------------------------------------------------- configs


def text_config(spec: dict, tok: dict) -> dict:
    n = spec["num_hidden_layers"]
    layer_types = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "eos_token_id": tok["im_end"],
        "full_attention_interval": 4,
        "head_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_types": layer_types,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_value_head_dim": 32,
        "max_position_embeddings": 4096,
        "model_type": "qwen3_5_text",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": 4,
        "num_hidden_layers": n,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": [2, 1, 1],
            "partial_rotary_factor": 0.25,
            "rope_theta": 10000.0,
            "rope_type": "default",
        },
        "tie_word_embeddings": spec["tie"],
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def full_config(spec: dict, tok: dict) -> dict:
    import transformers

    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "image_token_id": tok["image_pad"],
        "model_type": "qwen3_5",
        "text_config": text_config(spec, tok),
        "tie_word_embeddings": spec["tie"],
        "transformers_version": transformers.__version__,
        "video_token_id": tok["video_pad"],
        "vision_config": {
            "deepstack_visual_indexes": [],
            "depth": 1,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "model_type": "qwen3_5_vision",
            "num_heads": 2,
            "num_position_embeddings": 16,
            "out_hidden_size": 64,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": tok["vision_end"],
        "vision_start_token_id": tok["vision_start"],
    }


# --------------------------------------------------------------------------- weights


def mtp_shapes(tc: dict) -> dict[str, tuple[int, ...]]:
    h, i, hd = tc["hidden_size"], tc["intermediate_size"], tc["head_dim"]
    nh, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
    p = "mtp.layers.0."
    return {
        "mtp.fc.weight": (h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,),
        "mtp.norm.weight": (h,),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (nh * hd * 2, h),
        p + "self_attn.k_proj.weight": (nkv * hd, h),
        p + "self_attn.v_proj.weight": (nkv * hd, h),
        p + "self_attn.o_proj.weight": (h, nh * hd),
        p + "self_attn.q_norm.weight": (hd,),
        p + "self_attn.k_norm.weight": (hd,),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
    }


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random values for one tensor, with a scale that keeps activations O(1)."""
    if name.endswith("linear_attn.A_log"):
        # decay rate exp(A_log) in (0.08, 1.6): per-step decays from ~0.07 to ~0.97
        return rng.uniform(-2.5, 0.5, size=shape)
    if name.endswith("linear_attn.dt_bias"):
        return rng.normal(0.5, 0.5, size=shape)
    if name.endswith("linear_attn.norm.weight"):
        return 1.0 + rng.normal(0.0, 0.1, size=shape)  # gated norm: plain x * w
    if name.endswith("linear_attn.conv1d.weight"):
        return rng.normal(0.0, 0.4, size=shape)
    if any(name.endswith(s) for s in ONE_PLUS_W_NORMS):
        return rng.normal(0.0, 0.1, size=shape)  # x * (1 + w)
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        return rng.normal(0.0, 0.25, size=shape)
    if name.startswith("model.visual."):
        if ".norm" in name and name.endswith(".weight"):  # LayerNorms
            return 1.0 + rng.normal(0.0, 0.1, size=shape)
        if name.endswith(".bias"):
            return rng.normal(0.0, 0.02, size=shape)
        return rng.normal(0.0, 0.05, size=shape)
    if name.endswith(".weight") and len(shape) == 2:
        return rng.normal(0.0, 0.8 / np.sqrt(shape[1]), size=shape)
    raise ValueError(f"no init rule for {name} {shape}")


def make_weights(model, tc: dict, spec: dict, init=random_tensor) -> dict[str, torch.Tensor]:
    """Stored tensors (bf16 / float32), in transformers' state-dict order, then mtp.*."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if spec["tie"]:
        shapes.pop("lm_head.weight")
    shapes.update(mtp_shapes(tc))
    rng = np.random.default_rng(spec["seed"])
    out = {}
    for name in sorted(shapes):  # sorted: independent of module registration order
        values = torch.from_numpy(init(name, shapes[name], rng))
        if any(name.endswith(s) for s in FLOAT32_TENSORS):
            out[name] = values.to(torch.float32)
        else:
            out[name] = values.to(torch.bfloat16)
    return {k: out[k] for k in shapes}


def write_safetensors(weights: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    meta = {"format": "pt"}
    if shards == 1:
        save_file(weights, str(out_dir / "model.safetensors"), metadata=meta)
        return
    sizes = {k: v.numel() * v.element_size() for k, v in weights.items()}
    total = sum(sizes.values())
    names = list(weights)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for k in names:
        groups[min(shards - 1, acc * shards // total)].append(k)
        acc += sizes[k]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: weights[k] for k in group}, str(out_dir / fname), metadata=meta)
        weight_map.update({k: fname for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- float64 mode

_LOW = (torch.float32, torch.bfloat16, torch.float16)


class Float64Everywhere(TorchDispatchMode):
    """Rewrites every requested low-precision dtype to float64 and records any op that
    still returns a low-precision floating tensor."""

    def __init__(self):
        super().__init__()
        self.low_precision_ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") in _LOW:
            kwargs["dtype"] = torch.float64
        out = func(*args, **kwargs)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dtype != torch.float64:
                self.low_precision_ops.add(str(func))
        return out


def load_hf(out_dir: Path, dtype: torch.dtype):
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()  # the mtp.* tensors are (correctly) reported as unused
    model = Qwen3_5ForConditionalGeneration.from_pretrained(
        out_dir, dtype=dtype, attn_implementation="eager"
    )
    model.eval()
    if dtype == torch.float64:  # transformers computes the rotary frequencies in float32
        rot = model.model.language_model.rotary_emb
        cfg = model.config.text_config
        dim = int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"])
        theta = cfg.rope_parameters["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        rot.inv_freq = inv
        rot.original_inv_freq = inv.clone()
        vrot = model.model.visual.rotary_pos_emb  # the same for the vision tower's 2D rotary
        vc = model.config.vision_config
        half = vc.hidden_size // vc.num_heads // 2
        vtheta = vc.rope_parameters["rope_theta"]
        vinv = 1.0 / (vtheta ** (torch.arange(0, half, 2, dtype=torch.float64) / half))
        vrot.inv_freq = vinv
        vrot.original_inv_freq = vinv.clone()
    return model


@torch.no_grad()
def run_hf(model, tokens: np.ndarray, prompt_len: int):
    """Prompt pass with cache, then one token at a time.  Returns (logits, hidden,
    no-cache logits, captured (input, output) of every full-attention layer for a
    no-cache pass over all tokens)."""
    final_norm = model.model.language_model.norm
    captured = []
    hook = final_norm.register_forward_hook(lambda m, i, o: captured.append(o))
    ids = torch.from_numpy(tokens)[None]
    logits, hidden = [], []
    out = model(input_ids=ids[:, :prompt_len], use_cache=True)
    logits.append(out.logits[0])
    hidden.append(captured.pop()[0])
    cache = out.past_key_values
    for t in range(prompt_len, len(tokens)):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0])
        hidden.append(captured.pop()[0])
    hook.remove()
    logits = torch.cat(logits).numpy()
    hidden = torch.cat(hidden).numpy()

    # no cache, whole sequence; capture the full-attention layers' input and output
    layers = model.model.language_model.layers
    fa = [i for i, layer in enumerate(layers) if layer.block_type == "full_attention"]
    io = {}
    hooks = [
        layers[i].register_forward_hook(
            lambda m, a, k, o, i=i: io.__setitem__(i, (a[0][0].numpy(), o[0].numpy())),
            with_kwargs=True,
        )
        for i in fa
    ]
    full = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return logits, hidden, full, io


# --------------------------------------------------------------------------- numpy MTP


def rms_norm(x, w, eps, one_plus=True):
    var = np.mean(x * x, axis=-1, keepdims=True)
    y = x / np.sqrt(var + eps)
    return y * ((1 + w) if one_plus else w)


def silu(x):
    return x / (1 + np.exp(-x))


def rope_cos_sin(positions, tc, dtype):
    rp = tc["rope_parameters"]
    dim = int(tc["head_dim"] * rp["partial_rotary_factor"])
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None]
    ang = np.concatenate([ang, ang], axis=-1)  # rotate-half layout
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def apply_rope(x, cos, sin):
    """x: [S, heads, hd]; rotate-half RoPE on the first cos.shape[-1] dims."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    half = r // 2
    rot = np.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    xr = xr * cos[:, None] + rot * sin[:, None]
    return np.concatenate([xr, xp], axis=-1)


def attention_decoder_layer(x, w: dict, positions, tc: dict):
    """One Qwen 3.5 full-attention decoder layer over a whole (causal) sequence.
    x: [S, H]; w: tensors named as under `layers.N.` (`self_attn.q_proj.weight`, ...)."""
    dtype = x.dtype
    eps = tc["rms_norm_eps"]
    nh, nkv, hd = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    s = x.shape[0]

    h = rms_norm(x, w["input_layernorm.weight"], eps)
    qg = (h @ w["self_attn.q_proj.weight"].T).reshape(s, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(s, nh * hd)
    k = (h @ w["self_attn.k_proj.weight"].T).reshape(s, nkv, hd)
    v = (h @ w["self_attn.v_proj.weight"].T).reshape(s, nkv, hd)
    q = rms_norm(q, w["self_attn.q_norm.weight"], eps)
    k = rms_norm(k, w["self_attn.k_norm.weight"], eps)
    cos, sin = rope_cos_sin(positions, tc, dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    rep = nh // nkv
    k = np.repeat(k, rep, axis=1)  # head j uses kv head j // rep
    v = np.repeat(v, rep, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * dtype.type(hd**-0.5)
    mask = np.triu(np.ones((s, s), dtype=bool), 1)
    scores = np.where(mask[None], -np.inf, scores)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(-1, keepdims=True)
    attn = np.einsum("hqk,khd->qhd", p, v).reshape(s, nh * hd)
    attn = attn * (1 / (1 + np.exp(-gate)))
    x = x + attn @ w["self_attn.o_proj.weight"].T

    h = rms_norm(x, w["post_attention_layernorm.weight"], eps)
    mlp = silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)
    return x + mlp @ w["mlp.down_proj.weight"].T


def mtp_forward(hidden, next_tokens, weights: dict, tc: dict, tied: bool, dtype):
    """MTP head: position i drafts token i+2 from hidden[i] (post final norm) and the
    embedding of next_tokens[i] (= t_{i+1}); RoPE position i.  Returns (logits, h)."""
    w = {k: v.astype(dtype) for k, v in weights.items()}
    eps = tc["rms_norm_eps"]
    embed = w["model.language_model.embed_tokens.weight"]
    head = embed if tied else w["lm_head.weight"]
    e = rms_norm(embed[next_tokens], w["mtp.pre_fc_norm_embedding.weight"], eps)
    h = rms_norm(hidden.astype(dtype), w["mtp.pre_fc_norm_hidden.weight"], eps)
    x = np.concatenate([e, h], axis=-1) @ w["mtp.fc.weight"].T
    layer = {k[len("mtp.layers.0.") :]: v for k, v in w.items() if k.startswith("mtp.layers.0.")}
    x = attention_decoder_layer(x, layer, np.arange(len(next_tokens)), tc)
    x = rms_norm(x, w["mtp.norm.weight"], eps)
    return x @ head.T, x


# --------------------------------------------------------------------------- tokenizer


def fresh_dir(name: str) -> Path:
    """tests/fixtures/<name>, emptied."""
    out_dir = FIXTURES / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir


def make_tokenizer(out_dir: Path) -> dict:
    from tokenizers import Tokenizer

    from mlxkit.tokenizer_build import train_bpe_tokenizer

    train_bpe_tokenizer(CORPUS, vocab_size=BPE_VOCAB, out_dir=out_dir)
    tk = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = {
        "im_end": "<|im_end|>",
        "endoftext": "<|endoftext|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "image_pad": "<|image_pad|>",
        "video_pad": "<|video_pad|>",
    }
    tok = {k: tk.token_to_id(v) for k, v in ids.items()}
    assert all(v is not None for v in tok.values()), tok
    tok["size"] = tk.get_vocab_size(with_added_tokens=True)
    tok["first_special"] = tok["endoftext"]
    assert tok["size"] <= VOCAB_SIZE, tok
    return tok


# --------------------------------------------------------------------------- vision fixtures

# Two tiny vision checkpoints that differ in every vision shape: patch size, temporal patch,
# spatial merge, position grid, head count. The text model is tiny_tied's.
VISION_SPECS = {
    "tiny_vision_p4": {
        "num_hidden_layers": 4,
        "tie": True,
        "shards": 1,
        "seed": SEED + 11,
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "num_position_embeddings": 16,
        },
        "image_pixels": (256, 2048),  # [shortest_edge, longest_edge]: 4 to 32 merged tokens
        "video_pixels": (256, 8192),
        "images": [(23, 37), (45, 18)],  # (height, width) of image0.png, image1.png
        "video": {"frames": 5, "height": 16, "width": 24, "fps": 2.0},
    },
    "tiny_vision_p6": {
        "num_hidden_layers": 4,
        "tie": True,
        "shards": 1,
        "seed": SEED + 12,
        "vision": {
            "depth": 2,
            "hidden_size": 48,
            "num_heads": 4,
            "intermediate_size": 96,
            "patch_size": 6,
            "temporal_patch_size": 3,
            "spatial_merge_size": 3,
            "num_position_embeddings": 25,
        },
        "image_pixels": (648, 5184),
        "video_pixels": (648, 15552),
        "images": [(41, 19), (30, 47)],
        "video": {"frames": 5, "height": 18, "width": 36, "fps": 3.0},
    },
}
VIDEO_SAMPLING = {"fps": 2, "min_frames": 4, "max_frames": 768}  # Qwen3VLVideoProcessor's


def vision_configs(spec: dict, tok: dict) -> tuple[dict, dict, dict]:
    """config.json, preprocessor_config.json and video_preprocessor_config.json."""
    config = full_config(spec, tok)
    config["vision_config"].update(spec["vision"])
    v = spec["vision"]
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": v["spatial_merge_size"],
        "patch_size": v["patch_size"],
        "temporal_patch_size": v["temporal_patch_size"],
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
    }
    lo, hi = spec["image_pixels"]
    image = {
        **common,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"longest_edge": hi, "shortest_edge": lo},
    }
    lo, hi = spec["video_pixels"]
    video = {
        **common,
        **VIDEO_SAMPLING,
        "video_processor_type": "Qwen3VLVideoProcessor",
        "do_sample_frames": True,
        "size": {"longest_edge": hi, "shortest_edge": lo},
    }
    return config, image, video


def random_vision_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """As random_tensor, with position embeddings large enough that a wrong interpolation or
    ordering shows in the output."""
    if name == "model.visual.pos_embed.weight":
        return rng.normal(0.0, 0.5, size=shape)
    return random_tensor(name, shape, rng)


def image_patches(image_path: Path, image_cfg: dict) -> tuple[np.ndarray, list[int]]:
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    kw = {
        k: image_cfg[k]
        for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    }
    proc = Qwen2VLImageProcessorPil(size=dict(image_cfg["size"]), **kw)
    out = proc(Image.open(image_path), return_tensors="np")
    return out["pixel_values"], [int(g) for g in out["image_grid_thw"][0]]


def video_patches(frames: np.ndarray, fps: float, video_cfg: dict):
    """Transformers' Qwen3-VL video pipeline for frames already at a valid size (so no resize,
    which would need torchvision): frame sampling, fused rescale+normalize, temporal padding,
    patchify, and the timestamps of the processor."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
        Qwen3VLVideoProcessor,
        smart_resize,
    )
    from transformers.video_utils import VideoMetadata

    sampler = SimpleNamespace(**VIDEO_SAMPLING)
    indices = Qwen3VLVideoProcessor.sample_frames(sampler, VideoMetadata(len(frames), fps=fps))
    video = torch.from_numpy(frames[indices]).permute(0, 3, 1, 2)[None]  # [1, F, C, H, W]
    p, tp, m = video_cfg["patch_size"], video_cfg["temporal_patch_size"], video_cfg["merge_size"]
    lo, hi = video_cfg["size"]["shortest_edge"], video_cfg["size"]["longest_edge"]
    size = smart_resize(len(indices), *video.shape[-2:], tp, p * m, lo, hi)
    assert size == tuple(video.shape[-2:]), ("fixture frames must need no resize", size)
    mean = torch.tensor(video_cfg["image_mean"]) * (1.0 / video_cfg["rescale_factor"])
    std = torch.tensor(video_cfg["image_std"]) * (1.0 / video_cfg["rescale_factor"])
    video = (video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    rows, t, h, w = Qwen3VLVideoProcessor.patchify(None, video, p, m, tp)
    stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, tp)
    return rows[0].numpy(), [t, h, w], indices, stamps


def vision_prompts(tok_file: Path, tok: dict, grids: dict, stamps: list[float], merge: int):
    """Token ids of the four model-level cases, written as Qwen's processor expands a chat:
    each image part → vision_start, one image pad per merged patch, vision_end; a video → per
    temporal group `<t.t seconds>` + vision_start + video pads + vision_end (the wrapped
    `<|vision_start|><|video_pad|><|vision_end|>` of the template replaced as a whole)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(tok_file))

    def image(g):
        return (
            "<|vision_start|>"
            + "<|image_pad|>" * (g[0] * g[1] * g[2] // merge**2)
            + ("<|vision_end|>")
        )

    _, h, w = grids["video"]
    video = "".join(
        f"<{s:.1f} seconds><|vision_start|>"
        + "<|video_pad|>" * (h * w // merge**2)
        + "<|vision_end|>"
        for s in stamps
    )
    user = "<|im_start|>user\n"
    reply = "<|im_end|>\n<|im_start|>assistant\n"
    texts = {
        "one_image": user + image(grids["image0"]) + "What is in the picture?" + reply,
        "two_images": user
        + image(grids["image0"])
        + "and"
        + image(grids["image1"])
        + "Compare the two pictures."
        + reply,
        "second_turn": user
        + image(grids["image0"])
        + "Describe it."
        + reply
        + "A small box.<|im_end|>\n"
        + user
        + "And this one? "
        + image(grids["image1"])
        + reply,
        "video": user + video + "What happens in the video?" + reply,
    }
    uses = {
        "one_image": ["image0"],
        "two_images": ["image0", "image1"],
        "second_turn": ["image0", "image1"],
        "video": ["video"],
    }
    ids = {k: np.array(tk.encode(v).ids, dtype=np.int64) for k, v in texts.items()}
    for k, v in ids.items():
        n_img = sum(np.prod(grids[u]) // merge**2 for u in uses[k] if u != "video")
        n_vid = np.prod(grids["video"]) // merge**2 if "video" in uses[k] else 0
        assert (v == tok["image_pad"]).sum() == n_img and (v == tok["video_pad"]).sum() == n_vid
    return ids, uses


def hf_vision_inputs(uses: list[str], pixels: dict, grids: dict, dtype) -> dict:
    """Keyword arguments of a transformers forward for the images / video a prompt uses."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    kw = {}
    images = [u for u in uses if u != "video"]
    if images:
        values = np.concatenate([pixels[u] for u in images]).astype(np_dtype)
        kw["pixel_values"] = torch.from_numpy(values)
        kw["image_grid_thw"] = torch.tensor([grids[u] for u in images])
    if "video" in uses:
        kw["pixel_values_videos"] = torch.from_numpy(pixels["video"].astype(np_dtype))
        kw["video_grid_thw"] = torch.tensor([grids["video"]])
    return kw


def hf_rope_index(model, ids: np.ndarray, uses: list[str], grids: dict, tok: dict) -> np.ndarray:
    """transformers' M-RoPE position ids [3, L] for one prompt (outside the float64 mode: they
    are integers, computed with a float32 multiply by time_interval = 1)."""
    input_ids = torch.from_numpy(ids)[None]
    mm_types = (input_ids == tok["image_pad"]).int() + 2 * (input_ids == tok["video_pad"]).int()
    images = [grids[u] for u in uses if u != "video"]
    image_grid = torch.tensor(images) if images else None
    video_grid = torch.tensor([grids["video"]]) if "video" in uses else None
    positions, _ = model.model.get_rope_index(input_ids, mm_types, image_grid, video_grid)
    return positions[:, 0].numpy()


@torch.no_grad()
def run_hf_vision(model, ids: np.ndarray, positions: np.ndarray, kw: dict):
    """Post-final-norm hidden states and logits of a no-cache pass over one multimodal prompt."""
    captured = []
    hook = model.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.append(o))
    out = model(
        input_ids=torch.from_numpy(ids)[None],
        position_ids=torch.from_numpy(positions)[:, None],
        use_cache=False,
        **kw,
    )
    hook.remove()
    return captured[0][0].numpy(), out.logits[0].numpy()


@torch.no_grad()
def hf_input_embeds(model, ids: np.ndarray, kw: dict, tok: dict) -> torch.Tensor:
    """The prompt's embeddings with the vision features in place (what the text model reads)."""
    embeds = model.model.get_input_embeddings()(torch.from_numpy(ids)[None])
    for key, grid, pad in (
        ("pixel_values", "image_grid_thw", "image_pad"),
        ("pixel_values_videos", "video_grid_thw", "video_pad"),
    ):
        if key in kw:
            out = model.model.get_image_features(kw[key], kw[grid])
            embeds[0, torch.from_numpy(ids == tok[pad])] = torch.cat(out.pooler_output)
    return embeds


GENERATE_TOKENS = 16  # greedy tokens of the `generate` reference
GENERATE_QUESTION = "What is in the picture?"


def generation_prompt(out_dir: Path, tok: dict, grid: list[int], merge: int) -> np.ndarray:
    """The prompt of the public-API greedy reference: one user message with image0 and a
    question, rendered by transformers with the fixture's chat template (the image part written
    as the template would: vision_start, image pad, vision_end), the pad then expanded once per
    merged patch as Qwen's processor does."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"))
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    text = fast.apply_chat_template(
        [{"role": "user", "content": image + GENERATE_QUESTION}],
        chat_template=(out_dir / "chat_template.jinja").read_text(),
        tokenize=False,
        add_generation_prompt=True,
    )
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(np.prod(grid)) // merge**2))
    return np.array(Tokenizer.from_file(str(out_dir / "tokenizer.json")).encode(text).ids)


@torch.no_grad()
def hf_greedy(model, ids: np.ndarray, kw: dict) -> tuple[np.ndarray, float]:
    """transformers' greedy generation (its own M-RoPE position bookkeeping, KV cache, stop
    tokens from generation_config.json) and the smallest top-1 − top-2 logit margin on the way."""
    out = model.generate(
        input_ids=torch.from_numpy(ids)[None],
        **kw,
        max_new_tokens=GENERATE_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    margins = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores]
    return out.sequences[0, len(ids) :].numpy(), min(margins)


def build_vision(name: str, spec: dict) -> dict:
    from PIL import Image
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    out_dir = fresh_dir(name)
    tok = make_tokenizer(out_dir)
    config, image_cfg, video_cfg = vision_configs(spec, tok)
    for fname, data in (
        ("config.json", config),
        ("preprocessor_config.json", image_cfg),
        ("video_preprocessor_config.json", video_cfg),
    ):
        (out_dir / fname).write_text(json.dumps(data, indent=2) + "\n")
    tc, merge = config["text_config"], spec["vision"]["spatial_merge_size"]

    with torch.device("meta"):
        skeleton = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**config))
    weights = make_weights(skeleton, tc, spec, init=random_vision_tensor)
    del skeleton
    write_safetensors(weights, out_dir, spec["shards"])

    # inputs: two PNG images through transformers' processor, one video through its pipeline
    rng = np.random.default_rng(spec["seed"] + 2000)
    pixels, grids = {}, {}
    for i, (h, w) in enumerate(spec["images"]):
        path = out_dir / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        pixels[f"image{i}"], grids[f"image{i}"] = image_patches(path, image_cfg)
    v = spec["video"]
    frames = rng.integers(0, 256, size=(v["frames"], v["height"], v["width"], 3), dtype=np.uint8)
    pixels["video"], grids["video"], frame_indices, stamps = video_patches(
        frames, v["fps"], video_cfg
    )
    assert grids["video"][0] >= 2, "the video must have at least two temporal groups"

    # the vision tower on all three at once (attention must stay within each image / group)
    order = ["image0", "image1", "video"]
    tower_in = np.concatenate([pixels[k] for k in order])
    tower_grids = torch.tensor([grids[k] for k in order])
    ids, uses = vision_prompts(out_dir / "tokenizer.json", tok, grids, stamps, merge)
    generate_ids = generation_prompt(out_dir, tok, grids["image0"], merge)

    results, positions, embeds64 = {}, {}, {}
    for dtype in (torch.float64, torch.float32):
        model = load_hf(out_dir, dtype)
        if not positions:
            positions = {c: hf_rope_index(model, ids[c], uses[c], grids, tok) for c in ids}
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        kws = {c: hf_vision_inputs(uses[c], pixels, grids, dtype) for c in ids}
        mode = Float64Everywhere() if dtype == torch.float64 else contextlib.nullcontext()
        with mode, torch.no_grad():
            tower = model.model.visual(
                torch.from_numpy(tower_in.astype(np_dtype)), grid_thw=tower_grids
            )
            results[dtype] = {"tower": tower.pooler_output.numpy()}
            for c in ids:
                results[dtype][c] = run_hf_vision(model, ids[c], positions[c], kws[c])
                if dtype == torch.float64:
                    embeds64[c] = hf_input_embeds(model, ids[c], kws[c], tok)
                else:  # the text model alone in float32, on the float64 vision features
                    results[dtype][c + "_text"] = (
                        model(
                            inputs_embeds=embeds64[c].to(dtype),
                            position_ids=torch.from_numpy(positions[c])[:, None],
                            use_cache=False,
                        )
                        .logits[0]
                        .numpy()
                    )
            if dtype == torch.float64:
                greedy, margin = hf_greedy(model, generate_ids, kws["one_image"])
        if dtype == torch.float64:
            assert not mode.low_precision_ops, mode.low_precision_ops
        del model
    r64, r32 = results[torch.float64], results[torch.float32]
    head = weights["model.language_model.embed_tokens.weight"].to(torch.float64).numpy()

    arrays = {
        "tower_grids": np.array([grids[k] for k in order]),
        "tower_f64": r64["tower"],
        "tower_f32": r32["tower"],
        "err_tower_f32": np.float64(np.abs(r32["tower"] - r64["tower"]).max()),
        "video_frames": frames,
        "video_fps": np.float64(v["fps"]),
        "video_frame_indices": np.asarray(frame_indices),
        "video_timestamps": np.array(stamps),
        "generate_ids": generate_ids,
        "generate_greedy_f64": greedy,
        "generate_margin_f64": np.float64(margin),
    }
    stats = {
        "generate_tokens": len(greedy),
        "generate_margin_f64": margin,
        "tower_std": float(r64["tower"].std()),
        "err_tower_f32": float(arrays["err_tower_f32"]),
    }
    for k in ("image0", "image1", "video"):
        arrays[f"{k}_patches"], arrays[f"{k}_grid"] = pixels[k], np.array(grids[k])
    for case in ids:
        (hidden64, logits64), pos = r64[case], positions[case]
        np.testing.assert_allclose(hidden64 @ head.T, logits64, rtol=0, atol=1e-12)
        err = float(np.abs(r32[case][1].astype(np.float64) - logits64).max())
        err_text = float(np.abs(r32[case + "_text"].astype(np.float64) - logits64).max())
        arrays.update(
            {
                f"{case}_ids": ids[case],
                f"{case}_positions": pos,
                f"{case}_hidden_f64": hidden64,
                f"{case}_err_f32": np.float64(err),
                f"{case}_err_text_f32": np.float64(err_text),
            }
        )
        stats[f"{case}_err_f32"] = err
        stats[f"{case}_err_text_f32"] = err_text
        stats[f"{case}_tokens"] = len(ids[case])
    # the float32 noise floor of this network: the largest error of any float32 run
    arrays["err_f32"] = np.float64(
        max(stats[f"{c}_{k}"] for c in ids for k in ("err_f32", "err_text_f32"))
    )
    stats["err_f32"] = float(arrays["err_f32"])
    np.savez(out_dir / "reference.npz", **arrays)
    assert 0.1 < stats["tower_std"] < 10, stats
    return stats


# --------------------------------------------------------------------------- main


def layer_weights(weights_f64: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in weights_f64.items() if k.startswith(prefix)}


def build(name: str, spec: dict) -> dict:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    out_dir = fresh_dir(name)
    tok = make_tokenizer(out_dir)
    config = full_config(spec, tok)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tc = config["text_config"]

    # shapes and state-dict names from transformers itself
    with torch.device("meta"):
        skeleton = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**config))
    weights = make_weights(skeleton, tc, spec)
    del skeleton
    assert sum(k.startswith("mtp.") for k in weights) == 15
    assert ("lm_head.weight" in weights) == (not spec["tie"])
    write_safetensors(weights, out_dir, spec["shards"])
    w64 = {k: v.to(torch.float64).numpy() for k, v in weights.items()}

    # the prompt and the decode tokens: ordinary (non-special) token ids
    rng = np.random.default_rng(spec["seed"] + 1000)
    n = PROMPT_LEN + DECODE_STEPS
    tokens = rng.integers(0, tok["first_special"], size=n).astype(np.int64)

    # transformers, float64 throughout
    model = load_hf(out_dir, torch.float64)
    sd = model.state_dict()
    for k, v in w64.items():  # the loaded model holds exactly the stored weights
        if not k.startswith("mtp."):
            assert np.array_equal(sd[k].numpy(), v), k
    if spec["tie"]:
        assert (
            model.lm_head.weight.data_ptr()
            == sd["model.language_model.embed_tokens.weight"].data_ptr()
        )
    mode = Float64Everywhere()
    with mode:
        logits64, hidden64, full64, io64 = run_hf(model, tokens, PROMPT_LEN)
    assert not mode.low_precision_ops, mode.low_precision_ops
    assert logits64.dtype == np.float64 and hidden64.dtype == np.float64

    # hidden-state semantics: the final-norm output feeds lm_head directly
    head = w64["model.language_model.embed_tokens.weight" if spec["tie"] else "lm_head.weight"]
    np.testing.assert_allclose(hidden64 @ head.T, logits64, rtol=0, atol=1e-12)
    hs = [t[0].numpy() for t in full64.hidden_states]
    assert len(hs) == tc["num_hidden_layers"] + 1
    np.testing.assert_allclose(hs[-1], hidden64, rtol=0, atol=1e-12)  # last entry: post-norm
    # cached incremental decode == one no-cache pass over the whole sequence
    cache_vs_full = float(np.abs(full64.logits[0].numpy() - logits64).max())
    assert cache_vs_full < 1e-10, cache_vs_full

    # the numpy attention layer reproduces transformers' full-attention layers
    layer_err = 0.0
    for i, (x_in, x_out) in io64.items():
        lw = layer_weights(w64, f"model.language_model.layers.{i}.")
        mine = attention_decoder_layer(x_in, lw, np.arange(n), tc)
        layer_err = max(layer_err, float(np.abs(mine - x_out).max()))
    assert layer_err < 1e-12, layer_err
    del model

    # transformers, float32 (as it ships)
    model32 = load_hf(out_dir, torch.float32)
    logits32, hidden32, _, _ = run_hf(model32, tokens, PROMPT_LEN)
    del model32
    err_f32 = float(np.abs(logits32.astype(np.float64) - logits64).max())

    # MTP reference
    mtp_logits64, mtp_hidden64 = mtp_forward(
        hidden64[: n - 1], tokens[1:], w64, tc, spec["tie"], np.float64
    )
    mtp_logits32, _ = mtp_forward(hidden32[: n - 1], tokens[1:], w64, tc, spec["tie"], np.float32)
    assert mtp_logits32.dtype == np.float32
    err_mtp_f32 = float(np.abs(mtp_logits32.astype(np.float64) - mtp_logits64).max())

    np.savez(
        out_dir / "reference.npz",
        tokens=tokens,
        prompt_len=np.int64(PROMPT_LEN),
        logits_f64=logits64,
        hidden_f64=hidden64,
        logits_f32=logits32,
        hidden_f32=hidden32,
        err_f32=np.float64(err_f32),
        mtp_logits_f64=mtp_logits64,
        mtp_hidden_f64=mtp_hidden64,
        mtp_logits_f32=mtp_logits32,
        err_mtp_f32=np.float64(err_mtp_f32),
    )

    # diagnostics: activations stay O(1) and every layer matters
    update = [float(np.linalg.norm(b - a) / np.linalg.norm(a)) for a, b in itertools.pairwise(hs)]
    stats = {
        "tokenizer_size": tok["size"],
        "logits_std": float(logits64.std(axis=-1).mean()),
        "mtp_logits_std": float(mtp_logits64.std(axis=-1).mean()),
        "layer_update_ratio": [round(u, 3) for u in update],
        "err_f32": err_f32,
        "err_mtp_f32": err_mtp_f32,
        "cache_vs_nocache_f64": cache_vs_full,
        "numpy_attention_layer_err_f64": layer_err,
    }
    for key in ("logits_std", "mtp_logits_std"):
        assert 0.3 < stats[key] < 30, stats
    return stats


def main(names: list[str]) -> None:
    """Builds the fixtures named on the command line (all of them without arguments)."""
    builders = {n: (build, s) for n, s in SPECS.items()}
    builders.update({n: (build_vision, s) for n, s in VISION_SPECS.items()})
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise SystemExit(f"unknown fixtures {unknown}; choose from {sorted(builders)}")
    for name in names or builders:
        torch.manual_seed(SEED)
        fn, spec = builders[name]
        stats = fn(name, spec)
        print(name, json.dumps(stats))


if __name__ == "__main__":
    main(sys.argv[1:])
