"""The Qwen 3.5 vision tower as a torch module written for Core ML export, one patch grid at
a time.

transformers' vision model cannot be traced: it derives the position-embedding taps, the
rotary angles and the attention segments from `grid_thw` with data-dependent shapes. Here a
grid (rows x cols of patches, one temporal group, hence one attention segment) is fixed
when the module is built, so every shape is a Python int and the traced graph is static.
What depends on the grid is kept small, because a multifunction package shares only what is
identical across its functions:

* the learned position table is resampled in the graph (bilinear, align_corners, exactly
  transformers' taps) from the one shared table, instead of storing a table per grid;
* the tower runs in raster order (row-major over the patch grid), where the 2D rotary
  angles separate into a per-row and a per-column table (rows x head_dim/4 values each),
  instead of a tokens x head_dim table per grid. Everything between the patch embedding and
  the merger is per token or attention over all tokens, so the order is free; the input
  arrives in transformers' merge-block order and is put back in it for the merger.

Parameter names are those of mlxkit's `VisionModel` (transformers' below `model.visual.`), so
its weights load as they are, apart from the two reshapes in `export_layout`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlxkit.models.qwen3_5_vision import LAYER_NORM_EPS, VisionConfig


def export_layout(weights: dict[str, np.ndarray], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """mlxkit's vision weights (`read_vision_weights`) -> this module's state dict: the Conv3d
    patch embedding (kernel = stride, so a Linear over the flattened patch) as [hidden,
    C*T*P*P] in the input's (C, T, P, P) order, and the position table as an image [1, hidden,
    side, side] for `F.interpolate`."""
    out = {name: torch.from_numpy(value) for name, value in weights.items()}
    patch = out["patch_embed.proj.weight"]  # [hidden, T, P, P, C]
    out["patch_embed.proj.weight"] = patch.permute(0, 4, 1, 2, 3).reshape(cfg.hidden_size, -1)
    side = cfg.position_grid_side
    out["pos_embed"] = out.pop("pos_embed.weight").T.reshape(1, cfg.hidden_size, side, side)
    return out


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(dim, cfg.intermediate_size)
        self.mlp.linear_fc2 = nn.Linear(cfg.intermediate_size, dim)


class VisionTower(nn.Module):
    """The weights, shared by every grid's `GridEncoder`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        dim, merged = cfg.hidden_size, cfg.hidden_size * cfg.spatial_merge_size**2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(cfg.patch_dim, dim)
        self.register_buffer(
            "pos_embed", torch.zeros(1, dim, cfg.position_grid_side, cfg.position_grid_side)
        )
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = nn.Module()
        self.merger.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.merger.linear_fc1 = nn.Linear(merged, merged)
        self.merger.linear_fc2 = nn.Linear(merged, cfg.out_hidden_size)

    @classmethod
    def from_weights(cls, cfg: VisionConfig, weights: dict[str, np.ndarray]) -> VisionTower:
        """The tower holding `weights` (checked by `read_vision_weights`), shared, not copied."""
        with torch.device("meta"):  # nothing allocated, nothing initialized
            tower = cls(cfg)
        tower.load_state_dict(export_layout(weights, cfg), strict=True, assign=True)
        return tower.eval()


def rotary_tables(positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq for positions 0..positions-1: transformers'
    axial rotary uses head_dim/4 frequencies per axis (computed here in float64)."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (np.arange(0, half, 2, dtype=np.float64) / half)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq
    return torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()


class GridEncoder(nn.Module):
    """patches [rows*cols, C*T*P*P] in transformers' order -> [rows*cols / merge^2,
    out_hidden_size], for one fixed grid of rows x cols patches."""

    def __init__(self, tower: VisionTower, rows: int, cols: int):
        super().__init__()
        cfg = tower.cfg
        self.tower = tower
        self.rows, self.cols, self.merge = rows, cols, cfg.spatial_merge_size
        self.dim, self.heads = cfg.hidden_size, cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        quarter = self.head_dim // 4
        cos_r, sin_r = rotary_tables(rows, self.head_dim, cfg.rope_theta)
        cos_c, sin_c = rotary_tables(cols, self.head_dim, cfg.rope_theta)
        # broadcast over (q|k, heads, rows, cols, head_dim/4)
        self.register_buffer("cos_rows", cos_r.reshape(rows, 1, quarter))
        self.register_buffer("sin_rows", sin_r.reshape(rows, 1, quarter))
        self.register_buffer("cos_cols", cos_c.reshape(1, cols, quarter))
        self.register_buffer("sin_cols", sin_c.reshape(1, cols, quarter))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        t, m, rows, cols, dim = self.tower, self.merge, self.rows, self.cols, self.dim
        n = rows * cols
        x = t.patch_embed.proj(patches)
        # merge-block order (row block, col block, row in block, col in block) -> an image
        # [1, dim, rows, cols], where the position table is added as an image too: on a grid
        # the size of the table, the table itself is the addend, so it stays the shared one
        x = x.reshape(rows // m, cols // m, m, m, dim).permute(4, 0, 2, 1, 3)
        x = x.reshape(1, dim, rows, cols)
        x = x + F.interpolate(t.pos_embed, size=(rows, cols), mode="bilinear", align_corners=True)
        x = x.reshape(dim, n).T  # raster order
        for block in t.blocks:
            x = x + self.attention(block, block.norm1(x))
            x = x + block.mlp.linear_fc2(
                F.gelu(block.mlp.linear_fc1(block.norm2(x)), approximate="tanh")
            )
        x = t.merger.norm(x)
        # raster -> merge-block order, each block of m*m patches concatenated
        x = x.reshape(rows // m, m, cols // m, m, dim).permute(0, 2, 1, 3, 4)
        x = x.reshape(n // (m * m), m * m * dim)
        return t.merger.linear_fc2(F.gelu(t.merger.linear_fc1(x)))

    def attention(self, block: VisionBlock, x: torch.Tensor) -> torch.Tensor:
        n, heads, hd = self.rows * self.cols, self.heads, self.head_dim
        qkv = block.attn.qkv(x).reshape(n, 3, heads, hd).permute(1, 2, 0, 3)  # [3, heads, n, hd]
        qk = self.rotate(qkv[:2].reshape(2, heads, self.rows, self.cols, hd))
        qk = qk.reshape(2, heads, n, hd)
        out = F.scaled_dot_product_attention(qk[0:1], qk[1:2], qkv[2:3])  # scale hd^-0.5
        return block.attn.proj(out.permute(0, 2, 1, 3).reshape(n, self.dim))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' q*cos + rotate_half(q)*sin with angles [row*f | col*f | row*f | col*f]
        over the head dims: quarters a and c turn by the row angle, b and d by the column's."""
        a, b, c, d = x.chunk(4, dim=-1)
        cr, sr, cc, sc = self.cos_rows, self.sin_rows, self.cos_cols, self.sin_cols
        return torch.cat([a * cr - c * sr, b * cc - d * sc, c * cr + a * sr, d * cc + b * sc], -1)
