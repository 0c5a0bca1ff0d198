"""`convert --rounding gptq`: learned rounding (GPTQ), streamed one decoder layer at a time.

Plain rounding ("nearest") puts each weight on its group's nearest level. GPTQ (Frantar et
al., 2022, arXiv:2210.17323) rounds the columns of a linear layer one by one and moves each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
H = Σ xᵀx of the layer's inputs on calibration text, so that the layer's *output* on that
text changes least: it minimises ‖XWᵀ − XŴᵀ‖², not ‖W − Ŵ‖². The levels themselves (each
group's scale and bias) are still mx.quantize's min/max ones: no clipping search anywhere, and
the embedding and output head (tied or not) and the MTP head keep plain rounding.

Why our own and not mlx-lm's `mlx_lm.quant.gptq`: it loads the whole model, keeps every
linear's Hessian at once (a 9B's 32 down_proj alone are 32 × 12288² float32, 19 GB), takes one
bits/group size for every linear and packs only 2, 4 and 8 bits, so the per-group 5 and 6
bits of `--recipe auto` cannot go through it. This one is the same algorithm (per-group
levels, lazy block updates, 1 % damping) run sequentially:
1. the calibration windows (`sensitivity.calibration_windows`, the set `--recipe auto`
   measures on; never the evaluation text) are embedded with the embedding as it is written;
2. per decoder layer: load it, record H of every linear's input over the windows, round
   every linear the recipe quantizes (GPTQ, at the recipe's bits and group size), put the
   rounded weights in the layer, and run the windows through it: the next layer sees the
   quantized model's hidden states, so later layers correct earlier ones' errors;
3. each rounded weight (packed codes, scales, biases: exactly what the converter writes) goes
   to a temporary folder, from which the converter's streaming pass copies its rows in place
   of rounding them itself.

Cost: two forward passes of one layer over the calibration tokens per layer, plus the
column loop (cols steps per linear). Memory: one layer (bf16 matrices), the hidden states
(tokens × hidden × 4 bytes: 5,120 × 4,096 × 4 = 84 MB for a 9B), every linear's H and, at the
widest linear, numpy's copy of its H and the float64 work of the inverse factor (about 38·cols²
bytes: 9B's down_proj, cols 12,288, 5.7 GB; 4B's 9,216, 3.2 GB). `peak_bytes` adds these up from
a config: 0.7 GB for a 0.8B, 1.9 GB for a 2B, 4.2 GB for a 4B, 7.7 GB for a 9B, so above a 0.8B
the converter's 1.5 GB bound does not hold with --rounding gptq (the planner says so).
Disk: the rounded weights, about the output's size. Measured on micro (benchmarks/results/
quality.md): a few seconds on 2 shared CPU cores.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxkit.errors import ConfigError

from .quantize import MODE, Recipe
from .reader import SourceCheckpoint
from .sensitivity import PREFIX, _embed, _load_layer, calibration_windows

ROUNDINGS = ("nearest", "gptq")  # nearest: mx.quantize's own rounding
BATCH_BYTES = 16 << 20  # of one linear's activations ([windows, tokens, width] float32) at once
MAX_TOKENS: int | None = None  # calibration tokens the converter rounds on: the whole set
DAMP = 0.01  # added to H's diagonal, times its mean: keeps H invertible (dead inputs, few tokens)


# The converter's memory bound (docs/convert.md, issue 23): a 9B converts within 1.5 GB.
MEMORY_BOUND = 1_500_000_000
# What `gptq` holds for one linear beyond its Hessian in MLX, per cols²: numpy's copy of it and
# the float64 work of `inverse_factor` (VmHWM above the Hessian: 38.2 at 2,048 columns, 37.2 at
# 3,072)
INVERSE_BYTES_PER_COL2 = 38


def peak_bytes(cfg) -> int:
    """A lower bound of what `round_layers` holds at once for a text config (no weights
    read), for the planner to say where --rounding gptq exceeds MEMORY_BOUND: in the largest
    decoder layer, every linear's float32 Hessian (4 cols² each, all kept until the layer is
    rounded), the inverse factor of the widest (INVERSE_BYTES_PER_COL2 cols²), two float32
    copies of the largest matrix and the layer's bf16 weights. The process itself (its
    imports, ~300 MB) and the hidden states come on top."""
    from mlxkit.layout import model_parameters

    layers: dict[str, list[tuple[int, int]]] = {}
    for path, shape in model_parameters(cfg, include_mtp=False):
        if path.startswith(f"{PREFIX}layers.") and path.endswith(".weight") and len(shape) == 2:
            layers.setdefault(path.split(".")[3], []).append(shape)
    return max(
        sum(4 * c * c + 2 * r * c for r, c in shapes)
        + INVERSE_BYTES_PER_COL2 * max(c for _, c in shapes) ** 2
        + 8 * max(r * c for r, c in shapes)
        for shapes in layers.values()
    )


def check_rounding(rounding: object) -> str:
    """--rounding takes one of ROUNDINGS."""
    if rounding not in ROUNDINGS:
        raise ConfigError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return rounding


# --- GPTQ on one matrix -----------------------------------------------------------------------


def inverse_factor(h: np.ndarray) -> np.ndarray:
    """U, upper triangular with Uᵀ U = (H + λI)⁻¹, λ = DAMP × mean(diag H): the factor GPTQ's
    error feedback reads (row k of U spreads column k's error over the columns after it)."""
    h = np.array(h, dtype=np.float64)
    h[np.diag_indices_from(h)] += DAMP * max(float(np.mean(np.diag(h))), 1e-8)
    return np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)


def gptq(
    w: np.ndarray, h: np.ndarray, bits: int, group_size: int, dtype: mx.Dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of `w` [rows, cols] (float32) for inputs of Hessian `h` [cols, cols]: the codes
    [rows, cols] (0 .. 2^bits − 1) and each group's scale and bias [rows, cols / group_size]
    (float32 values of `dtype`, the dtype they are stored in). A group's levels are taken
    (by mx.quantize) from its weights once the errors of the groups before it have been
    added, then its columns are rounded in turn, each one's error spread over the rest."""
    w = np.array(w, dtype=np.float32)
    u = inverse_factor(h)
    rows, cols = w.shape
    top = 2**bits - 1
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scales, biases = [], []
    for i in range(0, cols, group_size):
        j = i + group_size
        _, s, b = mx.quantize(mx.array(w[:, i:j]).astype(dtype), group_size, bits, mode=MODE)
        s = np.array(s.astype(mx.float32))[:, 0]
        b = np.array(b.astype(mx.float32))[:, 0]
        err = np.zeros((rows, group_size), dtype=np.float32)
        for k in range(i, j):
            q = np.clip(np.round((w[:, k] - b) / s), 0, top)
            codes[:, k] = q
            e = (w[:, k] - (q * s + b)) / u[k, k]
            w[:, k + 1 : j] -= np.outer(e, u[k, k + 1 : j])
            err[:, k - i] = e
        w[:, j:] -= err @ u[i:j, j:]
        scales.append(s)
        biases.append(b)
    return codes, np.stack(scales, axis=1), np.stack(biases, axis=1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [rows, cols] packed as mx.quantize packs them: each row one little-endian bit
    stream of `bits`-bit values, read as uint32 words."""
    rows, cols = codes.shape
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = np.packbits(planes.reshape(rows, cols * bits), axis=-1, bitorder="little")
    return stream.view("<u4")


# --- the rounded weights, on disk -------------------------------------------------------------


@dataclass
class Rounded:
    """The weights learned rounding wrote to `folder`, by module path, with their
    (bits, group size): the converter's pass takes their rows from here."""

    folder: Path
    rules: dict[str, tuple[int, int]]
    seconds: float = 0.0
    tokens: int = 0

    def save(self, module: str, rule: tuple[int, int], codes, scales, biases) -> None:
        np.save(self._file(module, "weight"), pack(codes, rule[0]))
        np.save(self._file(module, "scales"), scales)
        np.save(self._file(module, "biases"), biases)
        self.rules[module] = rule

    def rows(self, module: str, start: int, stop: int, dtype: mx.Dtype) -> list[mx.array]:
        """Rows [start, stop) of the packed weight, its scales and its biases (in `dtype`)."""
        out = []
        for part in ("weight", "scales", "biases"):
            a = mx.array(np.load(self._file(module, part), mmap_mode="r")[start:stop])
            out.append(a if part == "weight" else a.astype(dtype))
        return out

    def summary(self) -> str:
        return (
            f"rounding gptq: {len(self.rules)} linears of the decoder layers on "
            f"{self.tokens:,} calibration tokens, {self.seconds:.1f} s"
        )

    def _file(self, module: str, part: str) -> Path:
        return self.folder / f"{module}.{part}.npy"


# --- the streaming pass -----------------------------------------------------------------------


class _Sum:
    """Σ xᵀx of the inputs a linear sees (float32), over every call."""

    def __init__(self) -> None:
        self.h: mx.array | None = None

    def add(self, x: mx.array) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.h = x.T @ x if self.h is None else self.h + x.T @ x
        mx.eval(self.h)


class _Recording(nn.Module):
    """A linear that adds its input to a `_Sum` on its way through."""

    def __init__(self, linear: nn.Linear, total: _Sum):
        super().__init__()
        self.linear = linear
        self.total = total  # not an array: not a parameter

    def __call__(self, x: mx.array) -> mx.array:
        self.total.add(x)
        return self.linear(x)


def round_layers(
    ckpt: SourceCheckpoint,
    recipe: Recipe,
    dtype: mx.Dtype,
    folder: Path,
    max_tokens: int | None = None,
) -> Rounded:
    """GPTQ of every decoder-layer linear the recipe quantizes (see the module docstring),
    written to `folder`; `max_tokens` caps the calibration tokens (default: the whole set)."""
    from mlxkit.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    ids = calibration_windows(load_tokenizer(ckpt.directory), max_tokens)
    if ids.size == 0:
        raise ConfigError("the calibration set is shorter than one window for this tokenizer")
    embed = f"{PREFIX}embed_tokens.weight"
    x = _embed(ckpt, embed, ids, recipe.rule_for(embed, ckpt.tensors[embed].shape))
    # windows run BATCH_BYTES of MLP activations at a time (a 9B: one window)
    width = max(ckpt.cfg.hidden_size, ckpt.cfg.intermediate_size)
    step = max(1, BATCH_BYTES // (ids.shape[1] * width * 4))
    xs = [mx.array(x[i : i + step]) for i in range(0, len(x), step)]
    rounded = Rounded(folder, {}, tokens=int(ids.size))
    for i in range(ckpt.cfg.num_hidden_layers):
        layer = _load_layer(ckpt, i)
        linears = [
            (path, m)
            for path, m in tree_flatten(layer.leaf_modules(), is_leaf=nn.Module.is_module)
            if isinstance(m, nn.Linear)
        ]
        totals = {path: _Sum() for path, _ in linears}
        layer.update_modules(tree_unflatten([(p, _Recording(m, totals[p])) for p, m in linears]))
        for x in xs:
            mx.eval(layer(x))
        layer.update_modules(tree_unflatten(linears))
        new = []
        for path, m in linears:
            module = f"{PREFIX}layers.{i}.{path}"
            rule = recipe.rule_for(module, m.weight.shape)
            if rule is None:
                continue
            w = np.array(m.weight.astype(mx.float32))
            codes, scales, biases = gptq(w, np.array(totals[path].h), *rule, dtype)
            rounded.save(module, rule, codes, scales, biases)
            new.append((f"{path}.weight", _dequantized(rounded, module, dtype)))
        layer.load_weights(new, strict=False)
        xs = [layer(x) for x in xs]
        mx.eval(xs)
        # A DecoderLayer refers to itself (its compiled blocks are its bound methods): freed by
        # the collector, now, or every layer rounded stays resident until a full collection.
        del layer, linears, new
        gc.collect()
        mx.clear_cache()
    rounded.seconds = time.perf_counter() - t0
    (folder / "rules.json").write_text(json.dumps(rounded.rules))
    return rounded


def _dequantized(rounded: Rounded, module: str, dtype: mx.Dtype) -> mx.array:
    """The weight as the quantized model computes with it, from what was written."""
    bits, group_size = rounded.rules[module]
    rows = np.load(rounded._file(module, "weight"), mmap_mode="r").shape[0]
    w, scales, biases = rounded.rows(module, 0, rows, dtype)
    q = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=MODE)
    return q.astype(mx.float32)
