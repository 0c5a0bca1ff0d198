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
``mlxkit.tokenizer.train_bpe_tokenizer``) and ``reference.npz`` with logits and
hidden states from transformers (float64 and float32) and from an independent numpy
implementation of the MTP head.  See tests/fixtures/README.md for the array meanings.

The float64 transformers run is float64 throughout: transformers' Qwen 3.5 code casts
to float32 in several places (RMSNorm ``x.float()``, the gated norm, the gated delta
rule kernels, softmax, the rotary frequencies).  A torch dispatch mode rewrites every
requested float32 dtype to float64 during that run, and the script asserts that no
op produced a tensor in a lower precision.
"""

from __future__ import annotations

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


def make_weights(model, tc: dict, spec: dict) -> dict[str, torch.Tensor]:
    """Stored tensors (bf16 / float32), in transformers' state-dict order, then mtp.*."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if spec["tie"]:
        shapes.pop("lm_head.weight")
    shapes.update(mtp_shapes(tc))
    rng = np.random.default_rng(spec["seed"])
    out = {}
    for name in sorted(shapes):  # sorted: independent of module registration order
        values = torch.from_numpy(random_tensor(name, shapes[name], rng))
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


def make_tokenizer(out_dir: Path) -> dict:
    from tokenizers import Tokenizer

    from mlxkit.tokenizer import train_bpe_tokenizer

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


# --------------------------------------------------------------------------- main


def layer_weights(weights_f64: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in weights_f64.items() if k.startswith(prefix)}


def build(name: str, spec: dict) -> dict:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    out_dir = FIXTURES / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

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


def main() -> None:
    torch.manual_seed(SEED)
    for name, spec in SPECS.items():
        stats = build(name, spec)
        print(name, json.dumps(stats))


if __name__ == "__main__":
    main()
