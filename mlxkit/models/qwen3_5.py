"""Qwen 3.5 dense text model in MLX, with its multi-token-prediction (MTP) head.

Layout of the stack: three Gated-DeltaNet layers (linear attention with a fixed-size recurrent
state) for every gated full-attention layer, each followed by a SwiGLU MLP. Parameter paths
match mlx-lm's `qwen3_5` (`language_model.model.layers.N...`) so converted checkpoints are
interchangeable; the MTP head lives at `mtp.*`.

Norm convention: checkpoints in the Hugging Face layout store RMSNorm weights as w with the
model computing x·(1 + w); `sanitize_tensor` turns them into 1 + w once, at load time, so every
norm here is a plain `mx.fast.rms_norm`. The gated norm inside Gated-DeltaNet is the exception
(stored as is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx
from mlx import nn

from mlxkit import fields
from mlxkit.cache import (
    BatchKVCache,
    KVCache,
    KVQuantization,
    LinearAttentionCache,
    RowWrites,
)
from mlxkit.errors import ConfigError
from mlxkit.models.qwen3_5_vision import VisionConfig, VisionModel, apply_rotary

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
LAYER_TYPES = ("linear_attention", "full_attention")
# Upper bounds of config.json sizes, far above any Qwen 3.5 (9B: hidden 4096, 32 layers,
# 248,320 tokens, 262,144 positions) and low enough that nothing sized from them can ask
# for more memory than a machine has before a weight is read.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "linear_num_key_heads": 1024,
    "linear_num_value_heads": 1024,
    "linear_key_head_dim": 4096,
    "linear_value_head_dim": 4096,
    "linear_conv_kernel_dim": 64,
    "max_position_embeddings": 1 << 24,
    "mtp_num_hidden_layers": 16,
}
_REQUIRED = object()


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    layer_types: list[str]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = True
    mtp_num_hidden_layers: int = 0
    eos_token_id: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, config: dict) -> TextConfig:
        """Accepts the outer `qwen3_5` config (with `text_config`) or a bare `qwen3_5_text` one.

        A config.json is untrusted input: every field is type- and range-checked here, and
        the bounds (`LIMITS`) before anything is sized from them, so that a zero, a string
        or 10⁹ layers is one ConfigError instead of a ZeroDivisionError or an allocation
        that runs the machine out of memory."""
        config = fields.mapping(config, "the config")
        text = _text_section(config)
        read = _TextFields(text)
        hidden, heads = read.size("hidden_size"), read.size("num_attention_heads")
        n_layers = read.size("num_hidden_layers")
        if text.get("head_dim") is None and hidden % heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        layer_types = _layer_types(text, n_layers)
        rope = fields.mapping(text.get("rope_parameters") or {}, "rope_parameters")
        vocab = read.size("vocab_size")
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        eos = [] if eos is None else [eos] if not isinstance(eos, list) else eos
        # keyword arguments are evaluated in order, so the first bad field is the one reported
        cfg = cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=read.size("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=read.size("num_key_value_heads"),
            head_dim=read.size("head_dim", hidden // heads),
            **_linear_attention_sizes(read),
            layer_types=layer_types,
            **_norm_and_rope(read, rope),
            max_position_embeddings=read.size("max_position_embeddings", 262144),
            tie_word_embeddings=fields.boolean(
                text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)),
                "tie_word_embeddings",
            ),
            mtp_num_hidden_layers=read.size("mtp_num_hidden_layers", 0, lo=0),
            eos_token_id=[fields.integer(e, "eos_token_id", 0, vocab - 1) for e in eos],
        )
        cfg._check_head_ratios()
        return cfg

    def _check_head_ratios(self) -> None:
        """What the layers reshape by must divide evenly: heads share key/value heads in
        groups, and rotary embedding rotates pairs of dimensions."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(
                f"head_dim × partial_rotary_factor = {self.rotary_dim} rotary "
                "dimensions; must be a positive even number"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim
        )

    def is_linear(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == "linear_attention"


def _text_section(config: dict) -> dict:
    """The text model's fields: under `text_config` in a `qwen3_5` config, at the top level of
    a `qwen3_5_text` one. Checked first, so that another model's config is refused by its
    type rather than by whichever field it happens to lack."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type {fields.shown(model_type)} is not a Qwen 3.5 dense model "
            f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    text = fields.mapping(config.get("text_config", config), "text_config")
    if text.get("num_experts", 0):
        raise ConfigError("Qwen 3.5 mixture-of-experts checkpoints are not supported")
    return text


@dataclass(frozen=True)
class _TextFields:
    """Reads the text config's fields, a null one as if absent: it takes its default, and a
    required field without a value is an error that names the field, not a TypeError."""

    text: dict

    def get(self, key: str, default: object = _REQUIRED) -> object:
        if key in self.text and self.text[key] is not None:
            return self.text[key]
        if default is _REQUIRED:
            raise ConfigError(f"config.json lacks the text-model field {key!r}")
        return default

    def size(self, key: str, default: object = _REQUIRED, lo: int = 1) -> int:
        return fields.integer(self.get(key, default), key, lo, LIMITS.get(key))


def _layer_types(text: dict, n_layers: int) -> list[str]:
    """`layer_types` as given, or, for configs that predate it, the pattern that
    `full_attention_interval` describes (every n-th layer full attention)."""
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = fields.integer(
            text.get("full_attention_interval", 4), "full_attention_interval", 1, n_layers
        )
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(n_layers)
        ]
    layer_types = fields.sequence(layer_types, "layer_types")
    if len(layer_types) != n_layers:
        raise ConfigError(
            f"layer_types has {len(layer_types)} entries, num_hidden_layers is {n_layers}"
        )
    for i, kind in enumerate(layer_types):
        fields.string(kind, f"layer_types[{i}]", LAYER_TYPES)
    return list(layer_types)


def _linear_attention_sizes(read: _TextFields) -> dict[str, int]:
    """The Gated-DeltaNet layers' head counts and sizes, which are their own, not those of
    the full-attention layers."""
    return {
        "linear_num_key_heads": read.size("linear_num_key_heads"),
        "linear_num_value_heads": read.size("linear_num_value_heads"),
        "linear_key_head_dim": read.size("linear_key_head_dim"),
        "linear_value_head_dim": read.size("linear_value_head_dim"),
        "linear_conv_kernel_dim": read.size("linear_conv_kernel_dim", 4),
    }


def _norm_and_rope(read: _TextFields, rope: dict) -> dict[str, float]:
    """The norm epsilon and the rotary settings. Newer configs keep the rotary settings in
    `rope_parameters`, older ones at the top of the text config; the former wins."""
    text = read.text
    return {
        "rms_norm_eps": _fraction("rms_norm_eps", read.get("rms_norm_eps", 1e-6)),
        "rope_theta": fields.number(
            rope.get("rope_theta", text.get("rope_theta", 10_000_000.0)),
            "rope_theta",
            lo=0,
            hi=1e12,
            lo_open=True,
        ),
        "partial_rotary_factor": _fraction(
            "partial_rotary_factor",
            rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)),
        ),
    }


def _fraction(key: str, value: object) -> float:
    return fields.number(value, key, lo=0, hi=1, lo_open=True)


# --- checkpoint names -----------------------------------------------------------------------

# RMSNorms stored as w for x·(1 + w). `linear_attn.norm` is not among them.
_ZERO_CENTRED_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
)


def _is_zero_centred_norm(name: str) -> bool:
    return name.endswith(_ZERO_CENTRED_NORMS) or name in (
        "model.language_model.norm.weight",
        "mtp.norm.weight",
    )


def hf_name_to_mlx(name: str, tie_word_embeddings: bool) -> str | None:
    """Our parameter path for a Hugging Face tensor name; None for tensors we do not use."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model.") :]
    if name == "lm_head.weight":
        return None if tie_word_embeddings else "language_model.lm_head.weight"
    if name.startswith("mtp."):
        return name
    if name.startswith("model.visual."):
        return None
    return name  # unknown: kept, so the loader can name it in its error


def sanitize_tensor(
    name: str, value: mx.array, tie_word_embeddings: bool, dtype: mx.Dtype | None = None
) -> tuple[str, mx.array] | None:
    """One Hugging Face tensor → (our path, array), applied tensor by tensor so the converter
    can stream. `dtype` casts floating tensors first (A_log excepted: it stays float32), so
    1 + w is formed at the target precision rather than rounded through bf16."""
    path = hf_name_to_mlx(name, tie_word_embeddings)
    if path is None:
        return None
    floating = mx.issubdtype(value.dtype, mx.floating)
    if dtype is not None and floating and not name.endswith("A_log"):
        value = value.astype(dtype)
    if _is_zero_centred_norm(name):
        value = (value.astype(mx.float32) + 1.0).astype(value.dtype)
    elif name.endswith("conv1d.weight") and value.ndim == 3 and value.shape[1] == 1:
        value = value.swapaxes(1, 2)  # HF [C, 1, K] -> MLX Conv1d [C, K, 1]
    return path, value


# --- layers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotary:
    """Where the L tokens of one pass sit for the rotary embedding.

    Qwen 3.5 rotates by M-RoPE: three position axes (temporal, row, column), the interleaved
    `mrope_section` deciding which frequency follows which. A text token has one position on
    all three, which makes it ordinary RoPE: token i of the pass sits at the cache offset + i +
    `shift` (mx.fast.rope), `shift` being how far the images before it have moved the text
    positions (0 without images). A pass holding vision tokens brings M-RoPE's `cos` and `sin`
    [L, rotary_dim] instead (`mlxkit.vision.mrope_cos_sin`)."""

    shift: mx.array  # int32 scalar
    cos: mx.array | None = None
    sin: mx.array | None = None

    @classmethod
    def text(cls, shift: int = 0) -> Rotary:
        return cls(mx.array(shift, dtype=mx.int32))

    @property
    def arrays(self) -> tuple[mx.array, ...]:
        """The arrays a compiled block takes (it cannot take this object)."""
        return (self.shift,) if self.cos is None else (self.shift, self.cos, self.sin)


def _gated_delta():
    """mlx-lm's public gated-delta helpers, imported on first use: importing mlx_lm loads
    transformers (seconds), which commands that never run a model (plan, tiers, info) skip."""
    from mlx_lm.models import gated_delta

    return gated_delta


# Decode and verify lengths run the Gated-DeltaNet block compiled (see DecoderLayer); longer
# prefill chunks run eagerly, as tracing hundreds of recurrence steps would cost more than it saves.
_COMPILED_MAX_STEPS = 16


def _use_metal_kernel(q: mx.array) -> bool:
    """Whether mlx-lm's fused Metal kernel can run the recurrence (it needs Dk % 32 == 0)."""
    return mx.default_device() == mx.gpu and mx.metal.is_available() and q.shape[-1] % 32 == 0


def gated_delta_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    record: bool = False,
) -> tuple[mx.array, mx.array, mx.array | None]:
    """The gated delta rule S ← g·S + β·(v − g·S k) kᵀ, y = S q, over T steps, by mlx-lm's
    `gated_delta_kernel` (Apple GPU) or `gated_delta_ops`.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta: [B, T, Hv]; state [B, Hv, Dv, Dk].
    Returns y [B, T, Hv, Dv], the final state, and, with `record`, the state after every step
    [B, T, Hv, Dv, Dk] — what speculative verification needs to roll back without recomputing.
    mlx-lm returns only the final state, so recording runs it one step at a time: the same
    arithmetic as plain decoding's.
    """
    gd = _gated_delta()
    run = gd.gated_delta_kernel if _use_metal_kernel(q) else gd.gated_delta_ops
    if not record:
        y, state = run(q, k, v, g, beta, state)
        return y, state, None
    ys, states = [], []
    for t in range(q.shape[1]):
        step = slice(t, t + 1)
        y, state = run(q[:, step], k[:, step], v[:, step], g[:, step], beta[:, step], state)
        ys.append(y)
        states.append(state)
    return mx.concatenate(ys, axis=1), state, mx.stack(states, axis=1)


def _decay_and_beta(a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array):
    """Per-head decay g = exp(−exp(A_log)·softplus(a + dt_bias)) and write strength β = σ(b),
    in float32 as the reference computes them."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return _gated_delta().compute_g(A_log, a, dt_bias), mx.sigmoid(b)


@partial(mx.compile, shapeless=True)
def _output_gate(out: mx.array, gate: mx.array) -> mx.array:
    return out * mx.sigmoid(gate)


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class GatedRMSNorm(nn.Module):
    """RMSNorm(x)·w·silu(z), computed in float32 as the reference does."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        return _gated_rms_norm(x, z, self.weight, self.eps)


@partial(mx.compile, shapeless=True)
def _gated_rms_norm(x: mx.array, z: mx.array, weight: mx.array, eps: float) -> mx.array:
    y = mx.fast.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps)
    return (y * nn.silu(z.astype(mx.float32))).astype(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_k_heads = cfg.linear_num_key_heads
        self.n_v_heads = cfg.linear_num_value_heads
        self.dk = cfg.linear_key_head_dim
        self.dv = cfg.linear_value_head_dim
        self.kernel_size = cfg.linear_conv_kernel_dim
        key_dim = self.n_k_heads * self.dk
        value_dim = self.n_v_heads * self.dv
        conv_dim = self.conv_dim = cfg.linear_conv_dim
        self.split = [key_dim, 2 * key_dim]

        self.in_proj_qkv = nn.Linear(cfg.hidden_size, conv_dim, bias=False)  # [q | k | v]
        self.in_proj_z = nn.Linear(cfg.hidden_size, value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.n_v_heads, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.n_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, self.kernel_size, groups=conv_dim, bias=False
        )  # depthwise, causal through the left context kept in the cache
        self.A_log = mx.zeros((self.n_v_heads,), dtype=mx.float32)
        self.dt_bias = mx.ones((self.n_v_heads,))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, cfg.hidden_size, bias=False)

    def initial_state(self, cache: LinearAttentionCache | None, batch: int, dtype: mx.Dtype):
        """(conv window, recurrent state) to continue from: the cache's, or zeros."""
        if cache is not None and cache.conv_state is not None:
            return cache.conv_state, cache.recurrent_state
        return (
            mx.zeros((batch, self.kernel_size - 1, self.conv_dim), dtype=dtype),
            mx.zeros((batch, self.n_v_heads, self.dv, self.dk), dtype=mx.float32),
        )

    def __call__(self, x: mx.array, conv_state: mx.array, state: mx.array, record: bool = False):
        """A pure function of (input, states): returns the output, the conv input window
        [B, K-1+T, conv_dim], the new recurrent state and, with `record`, the per-step states."""
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x)  # [B, T, conv_dim]
        z = self.in_proj_z(x).reshape(B, T, self.n_v_heads, self.dv)
        g, beta = _decay_and_beta(self.in_proj_a(x), self.in_proj_b(x), self.A_log, self.dt_bias)

        conv_in = mx.concatenate([conv_state, qkv], axis=1)
        conv_out = nn.silu(self.conv1d(conv_in))
        q, k, v = mx.split(conv_out, self.split, axis=-1)
        q = q.reshape(B, T, self.n_k_heads, self.dk)
        k = k.reshape(B, T, self.n_k_heads, self.dk)
        v = v.reshape(B, T, self.n_v_heads, self.dv)
        # L2-normalised q and k (eps 1e-6 on the sum of squares), q also scaled by Dk^-0.5
        q, k = _gated_delta().normalize_qk(q, k, inv_scale=self.dk**-0.5, eps=1e-6)

        y, state, states = gated_delta_rule(q, k, v, g, beta, state, record=record)
        y = self.norm(y, z)
        return self.out_proj(y.reshape(B, T, -1)), conv_in, state, states


class Attention(nn.Module):
    """Full attention with a per-head sigmoid output gate, q/k RMSNorm and partial RoPE."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.rope_theta = cfg.rope_theta
        self.rotary_dim = cfg.rotary_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim * 2, bias=False)  # query | gate
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def __call__(
        self, x: mx.array, cache: KVCache | None = None, rotary: Rotary | None = None
    ) -> mx.array:
        """Causal attention over x, after what `cache` holds (its `update_and_fetch` writes the
        new keys/values and says which slots each query sees); no cache: x alone. `rotary`
        places the tokens (default: text at the cache offset)."""
        q, gate, k, v = self.project(x)
        return self.output(self.attend(q, k, v, cache, rotary), gate)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """q, k, v [B, heads, L, head_dim] (q and k normed, not yet rotated) and the gate."""
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, 2 * self.head_dim), 2, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(k).transpose(0, 2, 1, 3)
        return q, gate, k, v.transpose(0, 2, 1, 3)

    def attend(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        cache: KVCache | None = None,
        rotary: Rotary | None = None,
    ) -> mx.array:
        """The rotated queries' attention over the cache and the new keys/values."""
        L = q.shape[2]
        if rotary is not None and rotary.cos is not None:  # M-RoPE: cos, sin [L, rotary_dim]
            q, k = apply_rotary(q, rotary.cos, rotary.sin), apply_rotary(k, rotary.cos, rotary.sin)
        else:
            offset = 0 if cache is None else cache.offset
            if rotary is not None:
                offset = offset + rotary.shift
            rope = partial(
                mx.fast.rope,
                dims=self.rotary_dim,
                traditional=False,
                base=self.rope_theta,
                scale=1.0,
            )
            q, k = rope(q, offset=offset), rope(k, offset=offset)
        if cache is None:
            mask = "causal" if L > 1 else None
        else:
            k, v, mask = cache.update_and_fetch(k, v)
        if cache is not None and cache.quantized:
            return quantized_attention(q, k, v, self.scale, mask, cache.quantization)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)

    def output(self, out: mx.array, gate: mx.array) -> mx.array:
        """o_proj of the gated heads; out [B, heads, L, head_dim], gate [B, L, heads, head_dim]."""
        B, _, L, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(_output_gate(out, gate.reshape(B, L, -1)))


def quantized_attention(
    q: mx.array,
    keys: tuple[mx.array, mx.array, mx.array],
    values: tuple[mx.array, mx.array, mx.array],
    scale: float,
    mask: mx.array,
    quantization: KVQuantization,
) -> mx.array:
    """softmax(q·kᵀ·scale)·v with the keys and values held quantized: both products run on the
    packed rows (mx.quantized_matmul), so the cache is never dequantized as a whole. The same
    arithmetic as mlx-lm's `quantized_scaled_dot_product_attention`.

    q: [B, nh, L, hd]; keys, values: (packed, scales, biases) of [B, nkv, T, hd];
    mask: bool [L, T], True where a query sees a key."""
    B, nh, L, hd = q.shape
    nkv = keys[0].shape[1]
    bits, group_size = quantization.bits, quantization.group_size
    q = (q * scale).reshape(B, nkv, nh // nkv, L, hd)  # query heads grouped by their KV head
    keys = tuple(a[:, :, None] for a in keys)  # [B, nkv, 1, T, ..] broadcast over the group
    values = tuple(a[:, :, None] for a in values)
    scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=bits)
    scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)  # [B, nkv, nh/nkv, L, T]
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, nh, L, hd)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: mixer (Gated-DeltaNet or attention), then SwiGLU MLP.

    Small models on MLX are dominated by per-op overhead, so the fixed-shape parts are
    compiled per layer (`inputs=self.state` keeps them reading the current weights): the whole
    Gated-DeltaNet block for decode/verify lengths, and the whole attention block, whose KV
    buffers keep their shape between growth steps (the position is an array input). A pass with
    M-RoPE positions (a prompt chunk holding vision tokens) runs the attention block eagerly.
    """

    def __init__(self, cfg: TextConfig, linear: bool):
        super().__init__()
        self.is_linear = linear
        if linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        if not linear:
            self._attention = mx.compile(self._attention_block, inputs=self.state)
            self._batch_attention = mx.compile(self._batch_attention_block, inputs=self.state)
        else:
            self._linear = mx.compile(partial(self._linear_block, record=False), inputs=self.state)
            self._linear_recording = mx.compile(
                partial(self._linear_block, record=True), inputs=self.state
            )

    def _mlp_residual(self, h: mx.array) -> mx.array:
        return h + self.mlp(self.post_attention_layernorm(h))

    def _attention_block(
        self,
        x: mx.array,
        keys: mx.array | tuple,
        values: mx.array | tuple,
        offset: mx.array,
        bits: int | None,
        group_size: int | None,
        *rotary: mx.array,
    ):
        """(bits, group_size) of quantized buffers, None for full-precision ones (constants
        of the compiled graph, which is traced once per setting)."""
        quantization = None if bits is None else KVQuantization(bits, group_size)
        cache = KVCache(keys, values, offset, quantization)  # see KVCache.run
        out = self.self_attn(self.input_layernorm(x), cache, Rotary(*rotary))
        return self._mlp_residual(x + out), cache.keys, cache.values

    def _batch_attention_block(
        self, x: mx.array, keys: mx.array, values: mx.array, offset: mx.array, shift: mx.array
    ):
        """One decode step of a batch's sequences (`BatchKVCache.run`): `offset` and `shift`
        [B] place each row's token."""
        cache = RowWrites(keys, values, offset)
        out = self.self_attn(self.input_layernorm(x), cache, Rotary(shift))
        return self._mlp_residual(x + out), cache.keys, cache.values

    def _linear_block(self, x: mx.array, conv_state: mx.array, state: mx.array, record: bool):
        out, conv_in, state, states = self.linear_attn(
            self.input_layernorm(x), conv_state, state, record
        )
        return self._mlp_residual(x + out), conv_in, state, states

    def __call__(
        self,
        x: mx.array,
        cache: KVCache | LinearAttentionCache | None = None,
        rotary: Rotary | None = None,
    ) -> mx.array:
        """`rotary` matters to attention layers only: Gated-DeltaNet has no positions. An
        attention layer given a `BatchKVCache`, or a list of caches, runs a batch of
        sequences (`mlxkit.batch`)."""
        if isinstance(cache, list):
            return self._attention_rows(x, cache, rotary)
        if isinstance(cache, BatchKVCache):
            return cache.run(self._batch_attention, x, rotary.shift)
        if not self.is_linear:
            if cache is None:
                return self._mlp_residual(
                    x + self.self_attn(self.input_layernorm(x), cache, rotary)
                )
            attn, rotary = self.self_attn, rotary or Rotary.text()
            block = self._attention if rotary.cos is None else self._attention_block
            return cache.run(block, x, attn.n_kv_heads, attn.head_dim, *rotary.arrays)
        T = x.shape[1]
        conv_state, state = self.linear_attn.initial_state(cache, x.shape[0], x.dtype)
        record = cache is not None and cache.recording
        if T > _COMPILED_MAX_STEPS:
            block = partial(self._linear_block, record=record)
        else:
            block = self._linear_recording if record else self._linear
        out, conv_in, state, states = block(x, conv_state, state)
        if cache is not None:
            cache.update(conv_in, T, state, states)
        return out

    def _attention_rows(self, x: mx.array, caches: list[KVCache], rotary: Rotary) -> mx.array:
        """Row b of x [B, L, H] attends over caches[b], at its own offset and with its own
        shift (`rotary.shift` [B]): the projections and the MLP run on the whole batch, the
        attention itself per sequence, each over its own (quantized) KV buffers, which a
        row reaching `quantized_kv_start` may quantize on its own. The price is B small
        attention graphs per layer (full-precision caches share a `BatchKVCache` instead)."""
        attn = self.self_attn
        q, gate, k, v = attn.project(self.input_layernorm(x))
        rows = [
            cache.attend_eagerly(
                lambda c, b=b: attn.attend(
                    q[b : b + 1], k[b : b + 1], v[b : b + 1], c, Rotary(rotary.shift[b])
                ),
                attn.n_kv_heads,
                k.shape[2],
                attn.head_dim,
                x.dtype,
            )
            for b, cache in enumerate(caches)
        ]
        return self._mlp_residual(x + attn.output(mx.concatenate(rows), gate))


class TextBackbone(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, cfg.is_linear(i)) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(
        self,
        tokens: mx.array,
        cache: list | None = None,
        rotary: Rotary | None = None,
        embeddings: mx.array | None = None,
    ) -> mx.array:
        """`embeddings` [B, L, H] replace the tokens' own (a prompt with image features in place
        of its vision pads)."""
        h = self.embed_tokens(tokens) if embeddings is None else embeddings
        rotary = rotary or Rotary.text()
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, c, rotary)
        return self.norm(h)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.tied = cfg.tie_word_embeddings
        self.model = TextBackbone(cfg)
        if not self.tied:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.tied:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)


class MTPHead(nn.Module):
    """Drafts token i+2 from the main model's post-norm hidden state at i and token i+1."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pre_fc_norm_embedding = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = [DecoderLayer(cfg, linear=False) for _ in range(cfg.mtp_num_hidden_layers)]
        self.norm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)

    def __call__(
        self,
        embeddings: mx.array,
        hidden: mx.array,
        cache: list | None,
        rotary: Rotary | None = None,
    ) -> mx.array:
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
        )
        x = self.fc(x)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            x = layer(x, c, rotary)
        return self.norm(x)


class ShortlistHead:
    """The output head's rows for a shortlist of token ids (`mlxkit.draft_vocab`): draft
    logits over N tokens instead of the whole vocabulary. They are scattered back into a
    [..., V] row with -inf elsewhere, so that every consumer (greedy argmax, the sampling
    filters, the speculative-sampling rule) sees a whole-vocabulary row whose softmax is the
    shortlist's, zero outside it. The rows are copied once, when the shortlist is set (N/V of
    the head's bytes more), so a draft step reads only them. A plain attribute, not a module:
    the shortlist is no weight of the checkpoint."""

    def __init__(self, head: nn.Module, ids: mx.array, vocab_size: int):
        self.ids, self.vocab_size = ids, vocab_size
        self.weight = head["weight"][ids]
        self.scales = head["scales"][ids] if "scales" in head else None
        self.biases = head["biases"][ids] if "biases" in head else None
        keys = ("group_size", "bits", "mode") if self.scales is not None else ()
        self.quantized = {k: getattr(head, k) for k in keys}

    def __call__(self, hidden: mx.array) -> mx.array:
        """[..., H] -> [..., V] logits, -inf outside the shortlist."""
        if self.scales is None:
            short = hidden @ self.weight.T
        else:
            short = mx.quantized_matmul(
                hidden, self.weight, self.scales, self.biases, transpose=True, **self.quantized
            )
        full = mx.full((*short.shape[:-1], self.vocab_size), -mx.inf, dtype=short.dtype)
        return mx.put_along_axis(full, mx.broadcast_to(self.ids, short.shape), short, axis=-1)


class Model(nn.Module):
    """The whole Qwen 3.5 model: the text model, its MTP head and (with `vision`) the vision
    tower at `vision_tower` (models/qwen3_5_vision.py). `has_mtp` and `has_vision` are decided
    by the loader from the weights found; it also sets `vision_tokens`, `preprocessor` and
    `mrope_section` (mlxkit/vision.py) for a model with a tower.

    Every pass takes a `rotary` (`Rotary`: where its tokens sit; default text at the cache
    offset) and the main model optionally `embeddings` in place of the tokens' own."""

    def __init__(self, cfg: TextConfig, has_mtp: bool = True, vision: VisionConfig | None = None):
        super().__init__()
        self.config = cfg
        self.language_model = TextModel(cfg)
        if has_mtp and cfg.mtp_num_hidden_layers > 0:
            self.mtp = MTPHead(cfg)
        if vision is not None:
            self.vision_tower = VisionModel(vision)
        self.vision_tokens = self.preprocessor = self.mrope_section = None
        self.draft_head: ShortlistHead | None = None  # see use_draft_vocab

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self

    @property
    def has_vision(self) -> bool:
        return "vision_tower" in self

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.model.layers

    def __call__(
        self, tokens: mx.array, cache: list | None = None, rotary: Rotary | None = None
    ) -> mx.array:
        """Logits [B, L, vocab] of tokens [B, L], continuing from what `cache` holds."""
        return self.language_model.logits(self.hidden(tokens, cache, rotary))

    def logits_and_hidden(
        self, tokens: mx.array, cache: list | None = None, rotary: Rotary | None = None
    ) -> tuple[mx.array, mx.array]:
        """Logits and the post-final-norm hidden states the MTP head drafts from."""
        hidden = self.hidden(tokens, cache, rotary)
        return self.language_model.logits(hidden), hidden

    def hidden(
        self,
        tokens: mx.array,
        cache: list | None = None,
        rotary: Rotary | None = None,
        embeddings: mx.array | None = None,
    ) -> mx.array:
        """Post-final-norm hidden states, for callers that want logits at only some positions."""
        return self.language_model.model(tokens, cache, rotary, embeddings)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.language_model.logits(hidden)

    def mtp_forward(
        self,
        hidden: mx.array,
        next_tokens: mx.array,
        cache: list | None = None,
        rotary: Rotary | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Draft logits (`draft_logits`) for positions i+2 and the MTP's own post-norm hidden
        state.

        hidden: [B, L, H], the main model's post-norm hidden at positions i (or, for a further
        draft step, the previous `mtp_hidden`); next_tokens: [B, L], the tokens at i+1. The MTP
        attention places entry i where the main model placed token i (as vLLM and SGLang run
        it): its KV cache (`make_mtp_cache`) holds one entry per position, so `rotary` is the
        main model's for those positions.
        """
        mtp_hidden = self.mtp_hidden(hidden, next_tokens, cache, rotary)
        return self.draft_logits(mtp_hidden), mtp_hidden

    def draft_logits(self, mtp_hidden: mx.array) -> mx.array:
        """Logits [..., V] a draft is picked from: over the draft vocabulary when one is set
        (`use_draft_vocab`; -inf elsewhere), else the whole head's."""
        if self.draft_head is None:
            return self.language_model.logits(mtp_hidden)
        return self.draft_head(mtp_hidden)

    def use_draft_vocab(self, ids: mx.array | None) -> None:
        """Drafts over the token ids `ids` [N] from now on (None: the whole vocabulary)."""
        if ids is None:
            self.draft_head = None
            return
        lm = self.language_model
        head = lm.model.embed_tokens if lm.tied else lm.lm_head
        self.draft_head = ShortlistHead(head, ids, self.config.vocab_size)

    def mtp_hidden(
        self,
        hidden: mx.array,
        next_tokens: mx.array,
        cache: list | None = None,
        rotary: Rotary | None = None,
    ) -> mx.array:
        """`mtp_forward` without the lm_head: fills the MTP cache during prefill."""
        if not self.has_mtp:
            raise ConfigError("this model was loaded without MTP weights")
        embeddings = self.language_model.model.embed_tokens(next_tokens)
        return self.mtp(embeddings, hidden, cache, rotary)

    def make_cache(self, kv: KVQuantization | None = None) -> list:
        """Fresh caches for the main model; `kv` keeps the full-attention ones quantized."""
        return [
            LinearAttentionCache() if layer.is_linear else KVCache(quantization=kv)
            for layer in self.layers
        ]

    def make_mtp_cache(self, kv: KVQuantization | None = None) -> list:
        """The MTP head's caches, quantized like the main model's (it is one more attention
        layer whose cache grows with the context)."""
        return [KVCache(quantization=kv) for _ in range(self.config.mtp_num_hidden_layers)]
