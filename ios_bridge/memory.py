"""Bytes the runtime holds besides the weights, computed from the config alone.

Every formula here follows the arrays mlxkit's runtime (mlxkit/models/qwen3_5.py,
mlxkit/cache.py, mlxkit/generate.py) creates, and tests compare the KV and state formulas
with that runtime's caches. What was not checked: MLX Swift's Qwen 3.5 port (mlx-swift-lm),
which runs a bundle on the phone, was neither run nor read array by array against these
formulas, so its caches, conv windows and attention intermediates may differ; nothing here
was measured on an iPhone either. Treat the phone figures as mlxkit's graph on a phone.

Notation (in the docstrings): B = 1 (one sequence), b = bytes of the activation dtype
(bf16/fp16: 2), C = prefill chunk, T = keys in the KV cache, H = hidden, I = intermediate,
nh / nkv / hd = query heads / KV heads / head dim, Hk / Hv / Dk / Dv = Gated-DeltaNet key /
value heads and head dims, Dc = conv channels = 2·Hk·Dk + Hv·Dv, V = Hv·Dv, K = conv kernel,
k = MTP drafts per round. Vision tower (models/qwen3_5_vision.py): N = patches of one image
(its vision tokens · m², m = spatial merge), D / Iv / h / hv = vision hidden, MLP, heads, head
dim, P = values per patch (C·T·P·P).

Encoding an image is the one step whose memory grows with the square of its size (attention
over all of its patches), so the vision tower's activations are planned for the largest
image the runtime takes (`image_tokens`, by default the 1,280-token cap mlxkit and MLX Swift
apply), beside prefill and verification: they never run at the same time.

The KV cache may be quantized (`kv`, mlxkit.cache.KVQuantization: `kv_bits` 8 or 4, None for
the activation dtype): per row of hd values, hd·bits/32 uint32 words plus a scale and a bias
in the activation dtype for each group of `group_size` values, as KVCache and mlx-lm's
QuantizedKVCache store it. Attention over a quantized cache has no fused kernel at any length
(mx.quantized_matmul, then softmax, then mx.quantized_matmul), so its [nh, C, T] scores exist
for every pass, verification included.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxkit.cache import KVCache, KVQuantization
from mlxkit.models.qwen3_5 import TextConfig
from mlxkit.models.qwen3_5_vision import VisionConfig

KV_STEP = KVCache.step  # the runtime grows KV buffers in steps of this many tokens
FLOAT32 = 4
MASK_BYTES = 1  # the causal mask of the unfused attention path is bool
# Head dims of MLX's fused full-attention (prefill) kernel on Metal, `sdpa_full`, in the MLX
# the runtimes were written against (0.31: mlx/backend/metal/scaled_dot_product_attention.cpp
# takes 64, 80 and 128). Any other head dim falls back to matmul → softmax → matmul, which
# materialises the [heads, queries, keys] scores. MLX PR #4330 (merged 2026-08) adds 72, the
# 9B vision tower's head dim; the mlx-swift a bundle runs was not checked for it, so the plan
# keeps counting those scores (an over- rather than an under-estimate).
FUSED_ATTENTION_HEAD_DIMS = (64, 80, 128)


def fused_attention(head_dim: int) -> bool:
    return head_dim in FUSED_ATTENTION_HEAD_DIMS


def n_linear_layers(cfg: TextConfig) -> int:
    return sum(cfg.is_linear(i) for i in range(cfg.num_hidden_layers))


def n_full_layers(cfg: TextConfig) -> int:
    return cfg.num_hidden_layers - n_linear_layers(cfg)


def n_kv_layers(cfg: TextConfig, mtp: bool) -> int:
    """Layers with a KV cache: the full-attention ones, plus the MTP head's decoder layer(s)
    (the MTP layer keeps its own cache, one entry per position, like any attention layer)."""
    return n_full_layers(cfg) + (cfg.mtp_num_hidden_layers if mtp else 0)


def kv_row_bytes(cfg: TextConfig, dtype_bytes: int, kv: KVQuantization | None = None) -> int:
    """One position of one KV head's keys (or values): hd · b, or quantized hd · bits / 8
    (packed) + 2 · (hd / group_size) · b (a scale and a bias per group)."""
    hd = cfg.head_dim
    if kv is None:
        return hd * dtype_bytes
    return kv.packed_width(hd) * 4 + 2 * kv.groups(hd) * dtype_bytes


def kv_bytes_per_token_per_layer(
    cfg: TextConfig, dtype_bytes: int, kv: KVQuantization | None = None
) -> int:
    """keys + values: 2 · nkv · row (2 · nkv · hd · b unquantized)."""
    return 2 * cfg.num_key_value_heads * kv_row_bytes(cfg, dtype_bytes, kv)


def kv_bytes_per_token(
    cfg: TextConfig, dtype_bytes: int, mtp: bool, kv: KVQuantization | None = None
) -> int:
    return n_kv_layers(cfg, mtp) * kv_bytes_per_token_per_layer(cfg, dtype_bytes, kv)


def kv_allocated_tokens(tokens: int) -> int:
    """Tokens a KV buffer has room for after `tokens` were written: KVCache rounds up to
    whole steps of KV_STEP (256), so 257 tokens allocate 512."""
    return 0 if tokens <= 0 else -(-tokens // KV_STEP) * KV_STEP


def kv_cache_bytes(
    cfg: TextConfig, tokens: int, dtype_bytes: int, mtp: bool, kv: KVQuantization | None = None
) -> int:
    """What the KV caches allocate (buffers, not only the filled part) holding `tokens`."""
    return (
        n_kv_layers(cfg, mtp)
        * kv_allocated_tokens(tokens)
        * kv_bytes_per_token_per_layer(cfg, dtype_bytes, kv)
    )


def kv_layer_buffer_bytes(
    cfg: TextConfig, tokens: int, dtype_bytes: int, kv: KVQuantization | None = None
) -> int:
    """One layer's keys buffer (values are a second buffer of the same size; quantized, the
    packed words, scales and biases together). When the cache grows, the old and the new
    buffers of that layer coexist while it is copied, so the plan adds one layer's keys and
    values once more ("KV growth")."""
    return (
        kv_allocated_tokens(tokens) * cfg.num_key_value_heads * kv_row_bytes(cfg, dtype_bytes, kv)
    )


def materialises_scores(cfg: TextConfig, queries: int, kv: KVQuantization | None) -> bool:
    """Whether attention of `queries` new tokens holds the [nh, C, T] scores: always over a
    quantized cache; otherwise past MLX's vector kernel (C > 8) without a fused kernel for hd."""
    return kv is not None or (queries > 8 and not fused_attention(cfg.head_dim))


def conv_state_bytes(cfg: TextConfig, dtype_bytes: int) -> int:
    """Per Gated-DeltaNet layer: the last K-1 conv inputs, [K-1, Dc] in the model dtype."""
    return (cfg.linear_conv_kernel_dim - 1) * cfg.linear_conv_dim * dtype_bytes


def recurrent_state_bytes(cfg: TextConfig) -> int:
    """Per Gated-DeltaNet layer: S [Hv, Dv, Dk] in float32."""
    return (
        cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim * FLOAT32
    )


def linear_state_bytes(cfg: TextConfig, dtype_bytes: int) -> int:
    """Fixed, independent of the context: conv window + recurrent state of every linear layer."""
    return n_linear_layers(cfg) * (conv_state_bytes(cfg, dtype_bytes) + recurrent_state_bytes(cfg))


@dataclass(frozen=True)
class Activations:
    """The transient peak, split so a reader can see which term dominates."""

    layer_peak: int  # the largest single layer's simultaneous intermediates
    layer_kind: str  # which layer gives it
    retained: int  # buffers that outlive their layer during that phase
    logits: int
    phase: str  # "prefill" or "verify"

    @property
    def total(self) -> int:
        return self.layer_peak + self.retained + self.logits


def _linear_layer_peak(cfg: TextConfig, chunk: int, dtype_bytes: int) -> int:
    """Gated-DeltaNet at chunk length C, during the recurrence: residual x [C,H], z [C,V],
    g and β [C,Hv] float32, the conv input window [K-1+C, Dc], the conv output [C, Dc]
    (q, k, v are views of it), the normalised q and k [C, 2·Hk·Dk], the output y [C, V] and
    the new recurrent state [Hv, Dv, Dk] float32."""
    H, V, Dc = (
        cfg.hidden_size,
        cfg.linear_num_value_heads * cfg.linear_value_head_dim,
        cfg.linear_conv_dim,
    )
    qk = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
    return (
        chunk * (H + 2 * V + Dc + qk) * dtype_bytes
        + 2 * chunk * cfg.linear_num_value_heads * FLOAT32
        + (cfg.linear_conv_kernel_dim - 1 + chunk) * Dc * dtype_bytes
        + recurrent_state_bytes(cfg)
    )


def _attention_layer_peak(
    cfg: TextConfig, chunk: int, keys: int, dtype_bytes: int, kv: KVQuantization | None = None
) -> int:
    """Full attention over C new queries and T keys. With head_dim 256 MLX has no fused
    prefill kernel (its fused path takes head dims 64/80/128), so for C > 8 it falls back
    to matmul → softmax → matmul, materialising the score matrix [nh, C, T]: the scores
    and the probabilities (2 arrays) plus the bool causal mask [C, T]; over a quantized
    cache so does every pass (`materialises_scores`). Around them:
    residual [C,H], q_proj's output [C, 2·nh·hd] (the gate is a view of it), the roped and
    the scaled query [C, nh·hd] each, new keys and values [C, 2·nkv·hd], and the output."""
    H, nh, nkv, hd = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    around = chunk * (H + 2 * nh * hd + 2 * nh * hd + 2 * nkv * hd + nh * hd) * dtype_bytes
    if not materialises_scores(cfg, chunk, kv):  # MLX's vector or fused kernel
        return around
    return around + 2 * nh * chunk * keys * dtype_bytes + chunk * keys * MASK_BYTES


def score_matrix_bytes(
    cfg: TextConfig, chunk: int, keys: int, dtype_bytes: int, kv: KVQuantization | None = None
) -> int:
    """The largest transient single array of prefill: one [nh, C, T] score matrix."""
    if not materialises_scores(cfg, chunk, kv):
        return 0
    return cfg.num_attention_heads * chunk * keys * dtype_bytes


def _mlp_peak(cfg: TextConfig, chunk: int, dtype_bytes: int) -> int:
    """SwiGLU: residual, normed input, output [C, H] each; gate, up, silu(gate)·up [C, I]."""
    return chunk * (3 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype_bytes


def prefill_activations(
    cfg: TextConfig,
    chunk: int,
    context: int,
    keys: int,
    dtype_bytes: int,
    mtp: bool,
    image_tokens: int = 0,
    kv: KVQuantization | None = None,
) -> Activations:
    """Peak while prefilling the last chunk of a `context`-token prompt (`kv`: the cache's
    quantization, None for the activation dtype).

    layer peak = the largest of one Gated-DeltaNet layer, one attention layer over T = `keys`
    keys (the runtime attends over the KV cache's whole allocated buffer, masking the unused
    slots, so T is the allocated capacity, not the filled part), one MLP, and (with MTP) the
    MTP layer, whose input adds the [C, 2H] concatenation of embedding and hidden state.
    retained = the conv windows: each Gated-DeltaNet layer's cache keeps a view of its
    whole [K-1+C, Dc] conv input until the next chunk (the runtime slices, it does not
    copy), i.e. C·Dc·b per layer beyond the fixed K-1 rows; plus the chunk's final hidden
    states [C, H] kept for the MTP head; with an image in the prompt, its features and the
    prompt embeddings they are merged into, [image_tokens, H] each, until they are prefilled.
    logits = one row of float32 logits: prefill computes logits for the last position only.
    """
    rows = max(1, min(chunk, context))  # C: the queries of the last chunk
    span = max(keys, context)  # T
    peaks = {
        "gated-deltanet": _linear_layer_peak(cfg, rows, dtype_bytes),
        "attention": _attention_layer_peak(cfg, rows, span, dtype_bytes, kv),
        "mlp": _mlp_peak(cfg, rows, dtype_bytes),
    }
    if mtp and cfg.mtp_num_hidden_layers:
        peaks["mtp"] = peaks["attention"] + 2 * rows * cfg.hidden_size * dtype_bytes
    kind = max(peaks, key=peaks.get)
    windows = n_linear_layers(cfg) * rows * cfg.linear_conv_dim * dtype_bytes
    image = 2 * image_tokens * cfg.hidden_size * dtype_bytes
    retained = windows + rows * cfg.hidden_size * dtype_bytes + image
    return Activations(peaks[kind], kind, retained, cfg.vocab_size * FLOAT32, "prefill")


def verify_activations(
    cfg: TextConfig,
    num_draft: int,
    dtype_bytes: int,
    keys: int = 0,
    kv: KVQuantization | None = None,
) -> Activations:
    """Peak of one MTP round: verifying k+1 tokens makes every Gated-DeltaNet layer record
    its state after each position ([k+1, Hv, Dv, Dk] float32) and keep its [K-1+k+1, Dc]
    conv input, until the accepted prefix is committed; logits for the k+1 verified
    positions and the k draft steps (float32 rows). Over a quantized cache the attention
    layer holds its [nh, k+1, T] scores for T = `keys` too."""
    L = num_draft + 1
    recorded = n_linear_layers(cfg) * (
        L * recurrent_state_bytes(cfg)
        + (cfg.linear_conv_kernel_dim - 1 + L) * cfg.linear_conv_dim * dtype_bytes
    )
    layer = max(
        _linear_layer_peak(cfg, L, dtype_bytes),
        _mlp_peak(cfg, L, dtype_bytes),
        _attention_layer_peak(cfg, L, keys, dtype_bytes, kv) if kv is not None else 0,
    )
    logits = (L + num_draft) * cfg.vocab_size * FLOAT32
    return Activations(layer, "verify", recorded, logits, "verify")


def vision_patches(vision: VisionConfig, image_tokens: int) -> int:
    """N: the patches of an image of `image_tokens` vision tokens (each merges m² patches)."""
    return image_tokens * vision.spatial_merge_size**2


def vision_score_bytes(
    vision: VisionConfig, image_tokens: int, dtype_bytes: int, fused: bool | None = None
) -> int:
    """The tower's [h, N, N] attention scores, 0 where the attention is fused (`fused`; None:
    where MLX's fused kernel takes its head dim): the largest single array of encoding an
    image when they exist."""
    if fused_attention(vision.head_dim) if fused is None else fused:
        return 0
    return vision.num_heads * vision_patches(vision, image_tokens) ** 2 * dtype_bytes


def vision_mask_bytes(vision: VisionConfig, image_tokens: int, dtype_bytes: int) -> int:
    """The [1, N, N] additive mask mlx-swift-lm's Qwen 3 VL tower builds for every block
    (Qwen3VL.swift, `Attention`: ones · -1e9 with zeros over each image), in the activation
    dtype; mlxkit's tower attends image by image and builds none."""
    return vision_patches(vision, image_tokens) ** 2 * dtype_bytes


def vision_activations(
    vision: VisionConfig,
    image_tokens: int,
    dtype_bytes: int,
    mask: bool,
    fused: bool | None = None,
) -> Activations:
    """Peak while the tower encodes one image of `image_tokens` vision tokens (`fused` as for
    `vision_score_bytes`).

    retained = what lives through every block: the caller's float32 patches [N, P], the
    residual stream [N, D], the rotary cos and sin [N, hv] (float32).
    layer peak = the largest of
      - patch embedding: the patches cast to the tower's dtype [N, P] and its output [N, D];
      - position embedding: the four bilinear taps gathered [N, 4, D] in the tower's dtype and
        as float32, their weighted sum [N, D] float32 and its cast back [N, D];
      - attention: the normed input [N, D], qkv [N, 3D], the rotary of q and of k in float32
        (five [N, D] arrays each: the input, its negated half, the rotated halves, the two
        products), their casts back [N, 2D], q, k and v made contiguous for the attention
        [N, 3D], its output and the projection [N, D] each; plus, when MLX has no fused
        kernel for hv, the [h, N, N] scores and probabilities (2 · h·N²·b, as for the text
        attention; the CPU build was seen holding between one and two), and, with `mask`
        (mlx-swift-lm), its [N, N] mask;
      - MLP: normed input and output [N, D], the first linear, its tanh-approximated GELU and
        that GELU's two intermediates [N, Iv] each;
      - merger: its exact (erf) GELU over [N/m², m²·D] with the norm, the first linear and the
        intermediates around it, ten [N, D]-sized arrays, and the output [N/m², out].
    These are the arrays mlxkit's tower holds at each peak, phase by phase, as measured on the
    CPU build (tests/test_plan_vision.py holds the whole estimate against measured peaks: it
    came to 0.9–1.6× of them, below 1× only for images of a few hundred patches); MLX on Metal runs the same graph, and mlx-swift-lm's tower
    (Qwen3VL.swift) a similar one with the mask added; neither was measured.
    """
    N, D, Iv = vision_patches(vision, image_tokens), vision.hidden_size, vision.intermediate_size
    b = dtype_bytes
    retained = N * vision.patch_dim * FLOAT32 + N * D * b + 2 * N * vision.head_dim * FLOAT32
    attention = N * (D + 3 * D + 2 * D + 3 * D + 2 * D) * b + 2 * 5 * N * D * FLOAT32
    attention += 2 * vision_score_bytes(vision, image_tokens, b, fused)
    if mask:
        attention += vision_mask_bytes(vision, image_tokens, b)
    peaks = {
        "vision patch embedding": N * (vision.patch_dim + D) * b,
        "vision position embedding": N * 4 * D * (b + FLOAT32) + N * D * (FLOAT32 + b),
        "vision attention": attention,
        "vision MLP": N * (2 * D + 4 * Iv) * b,
        "vision merger": (10 * N * D + image_tokens * vision.out_hidden_size) * b,
    }
    kind = max(peaks, key=peaks.get)
    return Activations(peaks[kind], kind, retained, 0, "image encoding")


def activations(
    cfg: TextConfig,
    chunk: int,
    context: int,
    keys: int,
    dtype_bytes: int,
    mtp: bool,
    num_draft: int,
    image_tokens: int = 0,
    kv: KVQuantization | None = None,
) -> Activations:
    """Prefill and decoding never overlap, so the peak is the larger of the two phases (with
    `image_tokens` of an image prefilled; its encoding is `vision_activations`)."""
    pre = prefill_activations(cfg, chunk, context, keys, dtype_bytes, mtp, image_tokens, kv)
    if not mtp:
        return pre
    ver = verify_activations(cfg, num_draft, dtype_bytes, max(keys, context), kv)
    return pre if pre.total >= ver.total else ver
