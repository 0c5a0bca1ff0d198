"""Qwen 3.5 vision tower in MLX: pixels of images and video frames → embeddings for the text model.

Pipeline (shapes for one image of t·h·w patches, D = hidden size, m = spatial merge size):

    patches [t·h·w, C·T·P·P]  (the preprocessor's flattening, merge blocks consecutive)
      → patch embedding, a Conv3d with kernel = stride = (T, P, P), i.e. one matmul   [N, D]
      + learned position embeddings: a √n×√n grid bilinearly resampled (align_corners) to h×w
      → blocks: x + attn(LN(x)), x + MLP(LN(x)); attention is full within one image or one
        temporal group of a video, never across; 2D rotary (row and column frequencies)
      → merger: LN, each m×m block concatenated [N/m², m²·D], Linear, GELU, Linear  [N/m², out]

Patches arrive in merge-block order (for each block row and column, its m×m patches row by
row), so the merger's m×m neighbourhoods are consecutive rows and the position tables here
follow the same order.

Parameter paths and layouts are those mlx-vlm and mlx-swift-lm read from a converted
checkpoint: the tower lives at `vision_tower.*` (Hugging Face `model.visual.*`), every name below
it unchanged, and the patch embedding weight is stored channels-last, [D, T, P, P, C], which is
MLX's Conv3d layout (`sanitize_vision_tensor` does the one transpose). mlx-vlm 0.7 and
mlx-swift-lm both keep a 5-D weight whose last axis is `in_channels` as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx import nn

from mlxkit.errors import CheckpointError, ConfigError
from mlxkit.fields import number, shown

HF_PREFIX = "model.visual."
PREFIX = "vision_tower."
LAYER_NORM_EPS = 1e-6  # fixed in the reference implementation, not in config.json

Grid = tuple[int, int, int]  # (t, h, w) in patches, before merging


# Upper bounds of vision_config sizes, far above Qwen 3.5's towers (depth 27, hidden 1152,
# 2,304 position embeddings) and low enough that nothing is sized from an unchecked number.
VISION_LIMITS = {
    "depth": 256,
    "hidden_size": 1 << 14,
    "intermediate_size": 1 << 16,
    "num_heads": 1024,
    "out_hidden_size": 1 << 16,
    "patch_size": 128,
    "temporal_patch_size": 16,
    "spatial_merge_size": 16,
    "in_channels": 16,
    "num_position_embeddings": 1 << 20,
}


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    rope_theta: float = 10_000.0

    @classmethod
    def from_dict(cls, config: dict) -> VisionConfig:
        """The `vision_config` of an outer `qwen3_5` config.json (or that block itself)."""
        vc = config.get("vision_config", config)
        if not isinstance(vc, dict):
            raise ConfigError("config.json: vision_config must be an object")
        act = vc.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(
                f"vision_config.hidden_act {act!r} is not supported (Qwen 3.5 uses "
                "gelu_pytorch_tanh)"
            )
        deepstack = list(vc.get("deepstack_visual_indexes") or [])
        if deepstack:
            raise ConfigError(
                f"vision_config.deepstack_visual_indexes is {deepstack}: DeepStack vision towers "
                "(Qwen3-VL) are not supported; Qwen 3.5 checkpoints have none"
            )
        rope = vc.get("rope_parameters") or {}
        try:
            cfg = cls(
                depth=vc["depth"],
                hidden_size=vc["hidden_size"],
                intermediate_size=vc["intermediate_size"],
                num_heads=vc["num_heads"],
                out_hidden_size=vc["out_hidden_size"],
                patch_size=vc.get("patch_size", 16),
                temporal_patch_size=vc.get("temporal_patch_size", 2),
                spatial_merge_size=vc.get("spatial_merge_size", 2),
                in_channels=vc.get("in_channels", 3),
                num_position_embeddings=vc.get("num_position_embeddings", 2304),
                rope_theta=rope.get("rope_theta", 10_000.0),
            )
        except KeyError as e:
            raise ConfigError(f"config.json: vision_config lacks {e.args[0]!r}") from None
        cfg._check()
        return cfg

    def _check(self) -> None:
        for name, limit in VISION_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ConfigError(
                    f"config.json: vision_config.{name} must be a positive integer of at most {limit:,} "
                    f"(got {shown(value)})"
                )
        number(self.rope_theta, "config.json: vision_config.rope_theta", 0, lo_open=True)
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ConfigError(
                "config.json: vision_config.hidden_size / num_heads must be a multiple of 4 "
                "(the 2D rotary splits each head into row and column halves)"
            )
        if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            raise ConfigError(
                "config.json: vision_config.num_position_embeddings must be a square "
                f"(a √n×√n grid); got {self.num_position_embeddings}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C·T·P·P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


# --- checkpoint names -----------------------------------------------------------------------


def sanitize_vision_tensor(
    name: str, value: mx.array, dtype: mx.Dtype | None = None
) -> tuple[str, mx.array] | None:
    """One Hugging Face `model.visual.*` tensor → (`vision_tower.*` path, array); None for any
    other tensor. Pure and per tensor, so a converter can stream it. The Conv3d patch weight goes
    from PyTorch's [D, C, T, P, P] to MLX's [D, T, P, P, C]."""
    if not name.startswith(HF_PREFIX):
        return None
    path = PREFIX + name[len(HF_PREFIX) :]
    if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
        value = value.astype(dtype)
    if name.endswith("patch_embed.proj.weight"):
        if value.ndim != 5:
            raise CheckpointError(f"{name}: expected a 5-D Conv3d weight, got {value.shape}")
        value = value.transpose(0, 2, 3, 4, 1)
    return path, value


# --- positions (computed from the grids alone, on the host) -----------------------------------


def merge_block_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of an h×w grid, in merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")

    def blocks(a):
        return a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)

    return blocks(rows), blocks(cols)


def _align_corners_taps(n: int, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resampling of `side` source points to `n` targets with aligned corners: for each
    target, the lower and upper source index and the weight of the upper one."""
    src = np.arange(n, dtype=np.float64) * (side - 1) / max(n - 1, 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, side - 1)
    return lo, hi, src - lo


def position_embedding_taps(grid: Grid, side: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """For each patch of `grid` (merge-block order, repeated for each of the t frames), the four
    rows of the √n×√n position table to mix and their bilinear weights: [t·h·w, 4] each."""
    t, h, w = grid
    rows, cols = merge_block_order(h, w, m)
    r_lo, r_hi, r_f = (a[rows] for a in _align_corners_taps(h, side))
    c_lo, c_hi, c_f = (a[cols] for a in _align_corners_taps(w, side))
    index = np.stack(
        [r_lo * side + c_lo, r_lo * side + c_hi, r_hi * side + c_lo, r_hi * side + c_hi], axis=-1
    )
    weight = np.stack([(1 - r_f) * (1 - c_f), (1 - r_f) * c_f, r_f * (1 - c_f), r_f * c_f], axis=-1)
    return np.tile(index, (t, 1)), np.tile(weight, (t, 1))


def rotary_angles(grid: Grid, head_dim: int, theta: float, m: int) -> np.ndarray:
    """2D rotary angles [t·h·w, head_dim / 2]: a quarter of the head turns with the patch row, the
    next quarter with its column (the same frequencies); rotate-half pairs i and i + head_dim/2."""
    t, h, w = grid
    rows, cols = merge_block_order(h, w, m)
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (np.arange(0, half, 2, dtype=np.float64) / half)
    angles = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], axis=-1)
    return np.tile(angles, (t, 1))


def attention_segments(grids: Sequence[Grid]) -> list[int]:
    """Lengths of the stretches of patches that attend to each other: one per image, one per
    temporal group of a video (its h·w patches)."""
    return [h * w for t, h, w in grids for _ in range(t)]


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half rotary on the first cos.shape[-1] features of x (the rest pass through),
    computed in float32; cos and sin must broadcast against x[..., :rotary_dim]."""
    r = cos.shape[-1]
    xr = x[..., :r].astype(mx.float32)
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    rotated = xr * cos + mx.concatenate([-x2, x1], axis=-1) * sin
    if r == x.shape[-1]:
        return rotated.astype(x.dtype)
    return mx.concatenate([rotated.astype(x.dtype), x[..., r:]], axis=-1)


# --- layers --------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over one patch is a matmul with its weight; the
    weight keeps MLX's Conv3d layout [D, T, P, P, C] (what other MLX readers expect)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden_size, self.patch_dim = cfg.hidden_size, cfg.patch_dim
        self.proj = nn.Conv3d(
            cfg.in_channels,
            cfg.hidden_size,
            kernel_size=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            stride=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
            bias=True,
        )

    def __call__(self, patches: mx.array) -> mx.array:
        # [D, C·T·P·P], the patch rows' order; the shape from the config, not the weight
        w = self.proj.weight.moveaxis(-1, 1).reshape(self.hidden_size, self.patch_dim)
        return patches.astype(w.dtype) @ w.T + self.proj.bias


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: list[int]):
        N, D = x.shape
        qkv = self.qkv(x).reshape(N, 3, self.n_heads, -1)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, heads, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = segmented_attention(q, k, v, segments, self.scale)
        return self.proj(out.reshape(N, D))


def segmented_attention(
    q: mx.array, k: mx.array, v: mx.array, segments: list[int], scale: float
) -> mx.array:
    """Full attention within each segment of the sequence. q, k, v: [N, heads, head_dim].
    Consecutive segments of equal length (the frames of one video) run as one batch."""
    outs, start, i = [], 0, 0
    while i < len(segments):
        n, count = segments[i], 1
        while i + count < len(segments) and segments[i + count] == n:
            count += 1
        sl = slice(start, start + n * count)
        qs, ks, vs = (
            a[sl].reshape(count, n, *a.shape[1:]).transpose(0, 2, 1, 3) for a in (q, k, v)
        )
        o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        outs.append(o.transpose(0, 2, 1, 3).reshape(n * count, *q.shape[1:]))
        start += n * count
        i += count
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(nn.gelu_approx(self.linear_fc1(x)))  # the tanh approximation


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: list[int]):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """m×m neighbouring patches → one token of the text model's width. The merged width comes
    from the config, never from a weight: a quantized linear stores a packed [out, in·bits/32]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))  # exact (erf) GELU


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = [VisionBlock(cfg) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)

    def __call__(self, patches: mx.array, grids: Sequence[Grid]) -> mx.array:
        """patches: [Σ t·h·w, C·T·P·P] for the images and videos of `grids`, in that order.
        Returns their embeddings [Σ t·h·w / m², out_hidden_size], in the same order."""
        cfg = self.config
        grids = [tuple(int(v) for v in g) for g in grids]
        self._check_grids(patches, grids)
        m, side = cfg.spatial_merge_size, cfg.position_grid_side

        x = self.patch_embed(patches)
        taps = [position_embedding_taps(g, side, m) for g in grids]
        index = mx.array(np.concatenate([i for i, _ in taps]).astype(np.int32))
        weight = mx.array(np.concatenate([w for _, w in taps]), dtype=mx.float32)
        pos = (self.pos_embed(index).astype(mx.float32) * weight[..., None]).sum(axis=1)
        x = x + pos.astype(x.dtype)

        angles = np.concatenate([rotary_angles(g, cfg.head_dim, cfg.rope_theta, m) for g in grids])
        angles = mx.array(np.concatenate([angles, angles], axis=-1), dtype=mx.float32)[:, None]
        cos, sin = mx.cos(angles), mx.sin(angles)  # [N, 1, head_dim], shared by all heads

        segments = attention_segments(grids)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)

    def _check_grids(self, patches: mx.array, grids: list[Grid]) -> None:
        m = self.config.spatial_merge_size
        for t, h, w in grids:
            if min(t, h, w) < 1 or h % m or w % m:
                raise ValueError(f"grid {(t, h, w)}: h and w must be positive multiples of {m}")
        n = sum(t * h * w for t, h, w in grids)
        if patches.ndim != 2 or patches.shape != (n, self.config.patch_dim):
            raise ValueError(
                f"patches of shape {tuple(patches.shape)} do not match the grids "
                f"({n} patches of {self.config.patch_dim} values)"
            )


# --- the merge into the text model ------------------------------------------------------------


def place_vision_embeddings(
    embeddings: mx.array, ids: np.ndarray, pad_id: int, features: mx.array
) -> mx.array:
    """Text embeddings [1, L, H] with the `pad_id` positions of ids [L] replaced, in order, by
    the tower's features [n, H] (the images', or the videos', concatenated in prompt order)."""
    where = np.flatnonzero(np.asarray(ids).reshape(-1) == pad_id)
    if len(where) != features.shape[0]:
        raise ValueError(f"{len(where)} vision pads in the prompt, {features.shape[0]} features")
    if len(where) == 0:
        return embeddings
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    flat[mx.array(where)] = features.astype(flat.dtype)
    return flat.reshape(embeddings.shape)
