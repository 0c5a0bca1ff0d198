"""`--recipe auto`: measure how much each tensor group's quantization costs, then spend a
bits-per-weight budget where it buys the most.

Measurement (`measure_sensitivity`), on the calibration set in `calibration/` (never the
evaluation text, never micro's training text; see its README):
1. Groups: per layer and kind (attention q/k/v/o, linear-attention in_proj (qkv and z), its
   small in_proj_a/b, out_proj, MLP gate/up/down), the embedding (with the output head when they
   are tied) and, untied, the head. The MTP head is not measured: it changes drafts, not the
   model's distribution; it gets the setting of least weight error within the same budget.
2. For each group alone quantized at the probe setting (4 bits, group 128: the least the
   body may get), the mean KL(source ‖ perturbed) of the next-token distributions is measured
   end to end. The source runs in float32, one decoder layer in memory at a time: every
   perturbed group is a stream of hidden states (on disk, in a temporary file) that each later
   layer carries along with the source's own, so each layer is read once. The head is applied
   in vocabulary chunks, the KL accumulated in float64 with running log-sum-exps.
3. Any other setting's KL is predicted from the probe's by the ratio of their squared weight
   errors (KL grows with the square of a small perturbation), and a recipe's KL as the sum over
   groups. `allocate` then raises, greedily, the group whose next setting removes the most
   predicted KL per byte, until the budget is spent. No clipping search anywhere (the output
   head in particular keeps absmax scales: clipping corrupts it).

Memory: one decoder layer's weights (bfloat16, as stored; 9B: 417 MiB), a probed group's copy,
one linear's float32 promotion at a time, ACTIVATION_BYTES of activations (a linear-attention
layer PIECE tokens at a time), the streams in a file read and written explicitly, no MLX
buffer cache: neither the layers nor the calibration tokens raise it. Measured at the 9B width
(benchmarks/results/convert.md, 2026-12-07): a probed layer-0 pass peaks at 1,080 MiB VmHWM,
of which ~220 MiB is the torch that importing mlx-lm's gated-delta ops brings in.

Cost: one float32 forward of every calibration window per group, each from its group's layer
on (about groups × layers / 2 layer passes per window). Measured here (2 CPU cores shared with
other jobs): micro, 51 groups on 1,024 tokens, 102 s. At the 9B width, one 256-token window
through one layer takes about 55 s (linear attention) to 47 s (attention) on this CPU, and
the weight errors (`_groups`) about 10 min per billion parameters: a real 4B/9B (≈200 groups,
32 layers, 4 windows) is days on this CPU; expect far less on a Mac GPU (not measured here).

The measurement is cached per source checkpoint (`source_digest`) and calibration set under
$XDG_CACHE_HOME/mlxkit/sensitivity/ (else ~/.cache); `Sensitivity.seconds` says what it cost.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from mlxkit import __version__
from mlxkit.cache import LinearAttentionCache
from mlxkit.errors import ConfigError
from mlxkit.layout import DTYPE_BYTES, checkpoint_tensor, fitting_group_size, output_dtype
from mlxkit.models.qwen3_5 import DecoderLayer, TextConfig
from mlxkit.quality import cache_dir as quality_cache_dir
from mlxkit.quality import checkpoint_digest

from .quantize import MODE, Recipe, Rule
from .reader import SourceCheckpoint, read_rows, row_chunks

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
CALIBRATION_TEXTS = ("code_feedparser.txt", "code_tupleobject_h.txt", "prose_idle_extend.txt")
CALIBRATION_CHAT = "chat.jsonl"
WINDOW = 256  # tokens per calibration window, each run from an empty state
# Calibration tokens measured by default: 4 windows. Each group's stream runs every later layer,
# so the cost grows with tokens × groups × layers (micro: about a minute on 2 shared CPU cores).
DEFAULT_TOKENS = 1024
BITS = (4, 5, 6, 8)  # the body is kept at 4 bits or more
GROUP_SIZES = (32, 64, 128)
PROBE = (4, 128)  # the setting each group's KL is measured at
DEFAULT_BITS_PER_WEIGHT = 4.5  # uniform 4-bit g64's bytes
# Activations (float32) a decoder layer or the head computes at once: with a layer's weights they
# set the measurement's peak memory, which neither the number of layers nor the calibration
# tokens may raise.
ACTIVATION_BYTES = 256 << 20
# Tokens a linear-attention layer runs at once, its state carried between pieces: the
# recurrence holds every step's state [Hv, Dv, Dk] until it is evaluated (4B, 9B: 2 MB a step,
# 512 MB for a window run whole). Above 16 (the compiled path's limit) so every piece takes
# the path a whole window takes: the same arithmetic, piece by piece.
PIECE = 32
CHUNK_BYTES = 64 << 20  # head rows (float32) per vocabulary chunk
VERSION = 1  # of the measurement: a cached one from another version is measured again
PREFIX = "language_model.model."


@dataclass
class Group:
    """One tensor group: its modules, its KL measured at PROBE, and per setting "bits/group"
    its bytes (weights, scales and biases) and squared weight error."""

    name: str
    modules: list[str]
    probe_kl: float
    nbytes: dict[str, int]
    error: dict[str, float]

    def kl(self, setting: str) -> float:
        """Predicted KL at `setting`: the probe's, scaled by the squared weight errors."""
        probe = self.error[_key(*PROBE)]
        return self.probe_kl * self.error[setting] / probe if probe > 0 else 0.0


@dataclass
class Sensitivity:
    source_digest: str
    calibration_digest: str
    tokens: int
    seconds: float
    text_parameters: int  # embeddings, layers, norm and head, unquantized
    fixed_bytes: int  # of the text model's unquantized tensors (norms, conv1d, A_log...)
    groups: list[Group]  # text-model groups
    mtp: Group | None  # the MTP head's linears (not measured: probe_kl 0)
    mtp_parameters: int
    mtp_fixed_bytes: int
    version: int = VERSION
    mlxkit_version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        groups = [Group(**g) for g in data["groups"]]
        mtp = Group(**data["mtp"]) if data.get("mtp") else None
        return cls(**{**data, "groups": groups, "mtp": mtp})

    def predicted_kl(self, recipe: Recipe) -> float | None:
        """The sum over groups of each group's predicted KL under `recipe` (a group whose
        modules the recipe splits takes its first module's setting); None when the recipe
        goes below 4 bits, where nothing was measured."""
        total = 0.0
        for g in self.groups:
            rule = recipe.rule_for(g.modules[0], (1, 128))
            if rule is not None and _key(*rule) not in g.error:
                return None
            total += g.kl(_key(*rule)) if rule is not None else 0.0
        return total


def _key(bits: int, group_size: int) -> str:
    return f"{bits}/{group_size}"


SETTINGS = [_key(b, g) for b in BITS for g in GROUP_SIZES]


# --- groups -----------------------------------------------------------------------------------


def group_of(module: str) -> str:
    """The group a quantized module belongs to (see the module docstring)."""
    if module.startswith("mtp."):
        return "mtp"
    name = module.removeprefix(PREFIX)
    if name == "embed_tokens":
        return "embeddings"
    if module == "language_model.lm_head":
        return "head"
    name = re.sub(r"linear_attn\.in_proj_(qkv|z)$", "linear_attn.in_proj", name)
    return re.sub(r"linear_attn\.in_proj_[ab]$", "linear_attn.in_proj_ab", name)


def _layer_of(group: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", group)
    return int(m.group(1)) if m else None


# --- calibration text -------------------------------------------------------------------------


def calibration_texts(tokenizer) -> list[str]:
    """The calibration files, the conversations rendered by the model's chat template."""
    texts = [(CALIBRATION_DIR / f).read_text(encoding="utf-8") for f in CALIBRATION_TEXTS]
    for line in (CALIBRATION_DIR / CALIBRATION_CHAT).read_text(encoding="utf-8").splitlines():
        if line.strip():
            c = json.loads(line)
            texts.append(
                tokenizer.apply_chat_template(
                    c["messages"], add_generation_prompt=False, tools=c.get("tools")
                )
            )
    return texts


def calibration_windows(tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """[windows, WINDOW] token ids: the calibration stream cut into whole windows."""
    ids = [t for text in calibration_texts(tokenizer) for t in tokenizer.encode(text)]
    n = len(ids) // WINDOW
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // WINDOW))
    return np.array(ids[: n * WINDOW], dtype=np.int32).reshape(n, WINDOW)


# --- source digest and cache ------------------------------------------------------------------


def source_digest(ckpt: SourceCheckpoint) -> str:
    """The checkpoint's digest (`mlxkit.quality.checkpoint_digest`: config.json, every
    tensor's name, dtype and shape, and its first 4 KiB), under which `mlxkit eval` keeps its
    results too: the planner finds both by it."""
    return checkpoint_digest(ckpt.directory)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/mlxkit/sensitivity (else ~/.cache), beside `mlxkit eval`'s results."""
    return quality_cache_dir().parent / "sensitivity"


def cached_sensitivity(digest: str, calibration: str) -> Sensitivity | None:
    """The cached measurement of a checkpoint, None when there is none (or it is unreadable,
    or from another version of the measurement)."""
    path = cache_dir() / f"{digest}-{calibration}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            return None
        return Sensitivity.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def cached_for_checkpoint(directory: str | Path, dtype: str = "bfloat16") -> Sensitivity | None:
    """The measurement `convert --recipe auto` of the checkpoint in `directory` would use (the
    default calibration tokens, scales in `dtype`) when it is cached, else None: what the
    planner reads, so that the auto recipe it plans is the one the converter writes. Reads
    the safetensors headers, 4 KiB of each tensor and the tokenizer; never the weights, and
    measures nothing."""
    from mlxkit.tokenizer import load_tokenizer

    ckpt = SourceCheckpoint.open(Path(directory), include_mtp=True, include_vision=False)
    _, calibration = _calibration(load_tokenizer(ckpt.directory), DEFAULT_TOKENS, dtype)
    return cached_sensitivity(source_digest(ckpt), calibration)


def _calibration(tokenizer, max_tokens: int | None, dtype: str) -> tuple[np.ndarray, str]:
    """The calibration windows and their digest (with the dtype of scales and biases, which
    the bytes of every setting depend on)."""
    ids = calibration_windows(tokenizer, max_tokens)
    return ids, hashlib.sha256(ids.tobytes() + dtype.encode()).hexdigest()[:16]


def _store(s: Sensitivity) -> None:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{s.source_digest}-{s.calibration_digest}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(s.to_dict()))
    tmp.replace(path)


# --- measurement ------------------------------------------------------------------------------


def measure_sensitivity(
    source_dir: str | Path,
    *,
    max_tokens: int | None = DEFAULT_TOKENS,
    dtype: str = "bfloat16",
    use_cache: bool = True,
    tmp_dir: str | Path | None = None,
) -> Sensitivity:
    """The sensitivity of the checkpoint in `source_dir` (see the module docstring), from the
    cache when it was measured before. `dtype` is the converter's output dtype (the bytes of
    scales, biases and unquantized tensors); `max_tokens` caps the calibration tokens."""
    from mlxkit.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    ckpt = SourceCheckpoint.open(Path(source_dir), include_mtp=True, include_vision=False)
    tokenizer = load_tokenizer(ckpt.directory)
    ids, calibration = _calibration(tokenizer, max_tokens, dtype)
    if ids.size == 0:
        raise ConfigError("the calibration set is shorter than one window for this tokenizer")
    digest = source_digest(ckpt)
    if use_cache and (hit := cached_sensitivity(digest, calibration)) is not None:
        return hit
    old_cache = mx.set_cache_limit(0)  # freed buffers go back at once: kept, they add to the peak
    try:
        groups, mtp, fixed = _groups(ckpt, dtype)
        probe_kl = _probe_kls(ckpt, ids, [g.name for g in groups], tmp_dir)
    finally:
        mx.set_cache_limit(old_cache)
        mx.clear_cache()
    for g in groups:
        g.probe_kl = probe_kl[g.name]
    text_params = sum(math.prod(i.shape) for p, i in ckpt.tensors.items() if _in_text(p))
    mtp_params = sum(math.prod(i.shape) for p, i in ckpt.tensors.items() if p.startswith("mtp."))
    result = Sensitivity(
        source_digest=digest,
        calibration_digest=calibration,
        tokens=int(ids.size),
        seconds=time.perf_counter() - t0,
        text_parameters=text_params,
        fixed_bytes=fixed["text"],
        groups=groups,
        mtp=mtp,
        mtp_parameters=mtp_params,
        mtp_fixed_bytes=fixed["mtp"],
    )
    if use_cache:
        _store(result)
    return result


def _in_text(path: str) -> bool:
    return path.startswith("language_model.")


def _groups(ckpt: SourceCheckpoint, dtype: str) -> tuple[list[Group], Group | None, dict]:
    """Every group's bytes and squared weight error at each setting (weights read in row
    chunks: rows quantize independently), and the bytes of what stays unquantized."""
    groups: dict[str, Group] = {}
    fixed = {"text": 0, "mtp": 0}
    scale_bytes = DTYPE_BYTES[dtype]
    for path, info in ckpt.tensors.items():
        part = "mtp" if path.startswith("mtp.") else "text"
        if len(info.shape) != 2:
            fixed[part] += math.prod(info.shape) * DTYPE_BYTES[output_dtype(path, dtype)]
            continue
        module = path.removesuffix(".weight")
        g = groups.setdefault(
            group_of(module),
            Group(
                group_of(module), [], 0.0, dict.fromkeys(SETTINGS, 0), dict.fromkeys(SETTINGS, 0.0)
            ),
        )
        g.modules.append(module)
        rows, cols = info.shape
        for setting in SETTINGS:
            bits, size = map(int, setting.split("/"))
            gs = fitting_group_size(cols, size)
            g.nbytes[setting] += rows * cols * bits // 8 + 2 * rows * (cols // gs) * scale_bytes
        for start, stop in row_chunks(info, CHUNK_BYTES // 2):
            w = _weight(ckpt, path, start, stop)
            for setting in SETTINGS:
                bits, size = map(int, setting.split("/"))
                g.error[setting] += float(
                    ((_fake_quantized(w, bits, fitting_group_size(cols, size)) - w) ** 2).sum()
                )
    mtp = groups.pop("mtp", None)
    return list(groups.values()), mtp, fixed


def _weight(ckpt: SourceCheckpoint, path: str, start: int, stop: int) -> mx.array:
    """Rows of one tensor in our layout, float32 (as the model runs them)."""
    info = ckpt.tensors[path]
    rows = read_rows(info, start, stop)
    _, value = checkpoint_tensor(info.name, rows, ckpt.cfg.tie_word_embeddings, mx.float32, False)
    return value.astype(mx.float32)


def _fake_quantized(
    w: mx.array, bits: int, group_size: int, dtype: mx.Dtype = mx.float32
) -> mx.array:
    """`w` as the quantized model computes with it (from its bfloat16 values, as written), in
    `dtype` (bfloat16 holds the dequantized values exactly, in half float32's memory)."""
    q = mx.quantize(w.astype(mx.bfloat16), group_size=group_size, bits=bits, mode=MODE)
    return mx.dequantize(*q, group_size=group_size, bits=bits, mode=MODE).astype(dtype)


def _load_layer(ckpt: SourceCheckpoint, i: int) -> DecoderLayer:
    """Decoder layer i: its matrices as stored (bfloat16: a matmul with float32 activations
    promotes them exactly, and a 9B layer then takes half the memory), everything else in
    float32 (the norms' 1 + w is formed there)."""
    cfg: TextConfig = ckpt.cfg
    layer = DecoderLayer(cfg, cfg.is_linear(i))
    prefix = f"{PREFIX}layers.{i}."
    weights = []
    for path, info in ckpt.tensors.items():
        if path.startswith(prefix):
            if len(info.shape) == 2:
                value = read_rows(info, 0, info.shape[0])
            else:
                value = _weight(ckpt, path, 0, info.shape[0])
            weights.append((path[len(prefix) :], value))
    layer.load_weights(weights)
    mx.eval(layer.parameters())
    for _, module in layer.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = _EagerLinear
    return layer


class _EagerLinear(nn.Linear):
    """A linear layer evaluated as soon as it is called. MLX allocates a graph's buffers as it
    queues its operations and frees them as they complete, so a layer run as one graph holds
    the float32 promotion of every bfloat16 matrix at once (9B: 0.9 GB); evaluated one by one,
    the largest alone (0.2 GB). The same arithmetic."""

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        mx.eval(y)
        return y


def _probe_kls(
    ckpt: SourceCheckpoint, ids: np.ndarray, names: list[str], tmp_dir: str | Path | None
) -> dict[str, float]:
    """Each group's KL at PROBE, measured end to end in one pass over the layers."""
    cfg = ckpt.cfg
    B, T = ids.shape
    input_groups = [n for n in names if n == "embeddings" or _layer_of(n) is not None]
    folder = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
    need = B * T * cfg.hidden_size * 4 * (1 + len(input_groups))
    if shutil.disk_usage(folder).free < need:
        raise ConfigError(
            f"measuring the sensitivity needs {need / 1e9:.2f} GB in {folder}: pass another "
            "folder (TMPDIR) or fewer calibration tokens"
        )
    per_step = _windows_per_step(cfg, T)
    with tempfile.TemporaryFile(dir=folder, prefix="mlxkit-sens-", suffix=".f32") as f:
        store = _Streams(f, B, T, cfg.hidden_size)
        index = {"source": 0}
        embed = f"{PREFIX}embed_tokens.weight"
        # stream 0: the source; the embeddings' stream: the input with the probe's table
        store.write(0, _embed(ckpt, embed, ids, None))
        if "embeddings" in input_groups:
            index["embeddings"] = len(index)
            store.write(index["embeddings"] * B, _embed(ckpt, embed, ids, PROBE))
        for i in range(cfg.num_hidden_layers):
            layer = _load_layer(ckpt, i)
            streams = len(index)
            for name in (n for n in input_groups if _layer_of(n) == i):
                index[name] = len(index)  # from the source's input, before its stream moves on
                _with_probe(layer, name, store, index[name], per_step)
            _run(layer, store, streams, per_step)
            # A DecoderLayer refers to itself (its compiled blocks are its bound methods): the
            # collector frees it, now, or it stays resident until the next full collection.
            del layer
            gc.collect()
            mx.clear_cache()
        return _head_kls(ckpt, store, index, "head" in names)


class _Streams:
    """The hidden states of every stream, [streams, B, T, H] float32, in a file read and
    written with explicit I/O: a memory map's touched pages would count as this process's
    resident memory, and a 9B's ~200 streams of 1,024 tokens are 3.4 GB. Windows are numbered
    across streams: stream s holds windows s·B to (s+1)·B."""

    def __init__(self, file, B: int, T: int, H: int):
        self.file, self.B, self.T, self.H = file, B, T, H

    def read(self, start: int, stop: int) -> np.ndarray:
        """Windows start..stop, [stop - start, T, H]."""
        return self.tokens(start * self.T, stop * self.T).reshape(-1, self.T, self.H)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Token rows start..stop of the windows laid end to end, [stop - start, H]."""
        self.file.seek(start * self.H * 4)
        values = np.fromfile(self.file, np.float32, (stop - start) * self.H)
        return values.reshape(stop - start, self.H)

    def write(self, start: int, values: np.ndarray) -> None:
        """`values` [n, T, H] as windows start..start + n."""
        self.file.seek(start * self.T * self.H * 4)
        np.ascontiguousarray(values, dtype=np.float32).tofile(self.file)


def _windows_per_step(cfg: TextConfig, T: int) -> int:
    """Windows a decoder layer runs at once, so that its float32 activations stay near
    ACTIVATION_BYTES whatever the calibration tokens and streams: per token, the widest
    projection (the MLP's intermediate, the linear attention's q|k|v or the attention's
    query and gate) thrice (gate, up and their product) and the hidden state in and out; per
    window, the Gated-DeltaNet states of a PIECE. Windows are independent (each starts from
    an empty state), so the step changes no result."""
    widest = max(
        cfg.intermediate_size, cfg.linear_conv_dim, 2 * cfg.num_attention_heads * cfg.head_dim
    )
    state = cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim
    per_window = 4 * (T * (3 * widest + 2 * cfg.hidden_size) + PIECE * state)
    return max(1, ACTIVATION_BYTES // per_window)


def _embed(ckpt: SourceCheckpoint, path: str, ids: np.ndarray, probe) -> np.ndarray:
    """The embeddings of `ids` [B, T], the table read in row chunks (quantized at `probe`)."""
    info = ckpt.tensors[path]
    out = np.zeros((*ids.shape, info.shape[1]), dtype=np.float32)
    for start, stop in row_chunks(info, CHUNK_BYTES // 2):
        at = (ids >= start) & (ids < stop)
        if at.any():
            w = _weight(ckpt, path, start, stop)
            if probe is not None:
                w = _fake_quantized(w, probe[0], fitting_group_size(w.shape[1], probe[1]))
            out[at] = np.array(w[mx.array(ids[at] - start)])
    return out


def _with_probe(
    layer: DecoderLayer, group: str, store: _Streams, stream: int, per_step: int
) -> None:
    """Into `stream`: the layer's output on the source's stream (0) with the group's weights
    quantized at PROBE (kept in the layer's dtype), `per_step` windows at a time."""
    params = dict(tree_flatten(layer.parameters()))
    members = [p for p in params if p.endswith(".weight") and params[p].ndim == 2]
    members = [p for p in members if group_of(f"layers.{_layer_of(group)}." + p[:-7]) == group]
    probed = []
    for p in members:
        w = params[p]
        q = _fake_quantized(w, PROBE[0], fitting_group_size(w.shape[1], PROBE[1]), w.dtype)
        mx.eval(q)  # one at a time: its quantization's temporaries are gone before the next
        probed.append((p, q))
    layer.load_weights(probed, strict=False)
    for start in range(0, store.B, per_step):
        x = mx.array(store.read(start, min(start + per_step, store.B)))
        store.write(stream * store.B + start, _layer_output(layer, x))
    layer.load_weights([(p, params[p]) for p in members], strict=False)


def _run(layer: DecoderLayer, store: _Streams, streams: int, per_step: int) -> None:
    """Every window of the first `streams` streams through the (unperturbed) layer, `per_step`
    windows at a time."""
    windows = streams * store.B
    for start in range(0, windows, per_step):
        x = mx.array(store.read(start, min(start + per_step, windows)))
        store.write(start, _layer_output(layer, x))


def _layer_output(layer: DecoderLayer, x: mx.array) -> np.ndarray:
    """layer(x) for windows x [n, T, H]; a linear-attention layer PIECE tokens at a time."""
    if not layer.is_linear:
        return np.array(layer(x))
    cache, pieces = LinearAttentionCache(), []
    for t in range(0, x.shape[1], PIECE):
        y = layer(x[:, t : t + PIECE], cache)
        mx.eval(y, cache.conv_state, cache.recurrent_state)
        pieces.append(np.array(y))
    return np.concatenate(pieces, axis=1)


def _head_kls(
    ckpt: SourceCheckpoint, store: _Streams, index: dict[str, int], untied_head: bool
) -> dict[str, float]:
    """Mean KL(source ‖ stream) of every stream, the head applied in vocabulary chunks (the
    tied embedding's stream, or the untied head's, with the head at PROBE)."""
    cfg = ckpt.cfg
    norm_path = f"{PREFIX}norm.weight"
    norm = _weight(ckpt, norm_path, 0, ckpt.tensors[norm_path].shape[0])
    head_path = (
        f"{PREFIX}embed_tokens.weight"
        if cfg.tie_word_embeddings
        else "language_model.lm_head.weight"
    )
    info = ckpt.tensors[head_path]
    probed_head = "embeddings" if cfg.tie_word_embeddings else "head"
    names = [n for n in index if n != "source"] + (["head"] if untied_head else [])
    S, H = len(index), store.H
    rows = store.B * store.T
    chunks = row_chunks(info, CHUNK_BYTES // 2)
    widest = max(max(b - a for a, b in chunks), H)
    block = max(1, ACTIVATION_BYTES // (S * widest * 8 * 3))  # float64 logits, temporaries
    totals = dict.fromkeys(names, 0.0)
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        hidden = np.stack([store.tokens(s * rows + r0, s * rows + r1) for s in range(S)])
        h = np.array(mx.fast.rms_norm(mx.array(hidden), norm, cfg.rms_norm_eps))
        acc = _KL(len(names), h.shape[1])
        for start, stop in chunks:
            w = _weight(ckpt, head_path, start, stop)
            wq = _fake_quantized(w, PROBE[0], fitting_group_size(w.shape[1], PROBE[1]))
            # numpy's BLAS: MLX's Linux CPU build multiplies float32 matrices ~70x slower (a
            # 9B chunk, 256 rows x 4,096 x 4,096: 3.7 s against 0.05 s), which made this pass
            # the measurement's largest cost there (30 min for 3 groups at 9B width)
            w, wq = np.array(w), np.array(wq)
            ref = (h[0] @ w.T).astype(np.float64)
            models = np.stack(
                [
                    h[index["source"] if n == "head" else index[n]]
                    @ (wq if n == probed_head else w).T
                    for n in names
                ]
            )
            acc.add(ref, models.astype(np.float64))
        for n, kl in zip(names, acc.kl()):
            totals[n] += float(kl.sum())
    return {n: totals[n] / rows for n in names}


class _KL:
    """KL(p ‖ q) per row from logits seen a vocabulary chunk at a time: running maxima and
    sums of exp for both log-sum-exps, and Σ exp(r − M_r)(r − m), rescaled as M_r grows."""

    def __init__(self, streams: int, rows: int):
        self.m_r = np.full(rows, -np.inf)
        self.s_r = np.zeros(rows)
        self.a = np.zeros((streams, rows))
        self.m_m = np.full((streams, rows), -np.inf)
        self.s_m = np.zeros((streams, rows))

    def add(self, r: np.ndarray, m: np.ndarray) -> None:
        """r [rows, chunk] (source), m [streams, rows, chunk]."""
        new_r = np.maximum(self.m_r, r.max(-1))
        e_r = np.exp(r - new_r[:, None])
        scale = np.exp(self.m_r - new_r)
        self.s_r = self.s_r * scale + e_r.sum(-1)
        self.a = self.a * scale + (e_r[None] * (r[None] - m)).sum(-1)
        self.m_r = new_r
        new_m = np.maximum(self.m_m, m.max(-1))
        self.s_m = self.s_m * np.exp(self.m_m - new_m) + np.exp(m - new_m[..., None]).sum(-1)
        self.m_m = new_m

    def kl(self) -> np.ndarray:
        lse_r = self.m_r + np.log(self.s_r)
        lse_m = self.m_m + np.log(self.s_m)
        return self.a / self.s_r - lse_r + lse_m


# --- allocation -------------------------------------------------------------------------------


class BudgetError(ConfigError):
    """A bits-per-weight budget below what keeps every weight at 4 bits or more."""


def smallest_bits_per_weight(s: Sensitivity) -> float:
    """The least bits per weight the text model can have with every group at 4 bits: the
    cheapest setting of each group, rounded up to the hundredth so that it can be passed."""
    nbytes = s.fixed_bytes + sum(min(g.nbytes.values()) for g in s.groups)
    return math.ceil(nbytes * 8 / s.text_parameters * 100 - 1e-9) / 100


def allocate(s: Sensitivity, bits_per_weight: float) -> dict[str, str]:
    """Group name -> setting "bits/group" of least predicted KL within `bits_per_weight` (over
    the text model's parameters, scales and biases counted as mlx-lm counts them); the MTP
    head, apart, takes the setting of least weight error within the same bits per weight.
    Greedy: start every group at its cheapest setting, then repeatedly take the move (to any
    costlier setting of lower KL) that removes the most KL per byte and still fits."""
    smallest = smallest_bits_per_weight(s)
    if not isinstance(bits_per_weight, (int, float)) or isinstance(bits_per_weight, bool):
        raise ConfigError(f"--bits-per-weight must be a number, got {bits_per_weight!r}")
    budget = bits_per_weight * s.text_parameters / 8 - s.fixed_bytes
    chosen = {g.name: min(SETTINGS, key=lambda k, g=g: (g.nbytes[k], g.error[k])) for g in s.groups}
    spent = sum(g.nbytes[chosen[g.name]] for g in s.groups)
    if spent > budget + 1e-6:
        raise BudgetError(
            f"--bits-per-weight {bits_per_weight:g} is below {smallest:.2f}, the smallest budget "
            "that keeps every weight at 4 bits or more; pass at least that"
        )
    while True:
        best, best_gain = None, 0.0
        for g in s.groups:
            now = chosen[g.name]
            for k in SETTINGS:
                extra = g.nbytes[k] - g.nbytes[now]
                gain = g.kl(now) - g.kl(k)
                if extra > 0 and gain > 0 and spent + extra <= budget and gain / extra > best_gain:
                    best, best_gain = (g, k, extra), gain / extra
        if best is None:
            break
        g, k, extra = best
        chosen[g.name] = k
        spent += extra
    if s.mtp is not None:
        mtp_budget = bits_per_weight * s.mtp_parameters / 8 - s.mtp_fixed_bytes
        fits = [k for k in SETTINGS if s.mtp.nbytes[k] <= mtp_budget]
        chosen["mtp"] = min(fits or SETTINGS, key=lambda k: (s.mtp.error[k], s.mtp.nbytes[k]))
    return chosen


def auto_recipe(s: Sensitivity, bits_per_weight: float) -> Recipe:
    """The `auto` recipe for this budget: one exact rule per quantized module."""
    chosen = allocate(s, bits_per_weight)
    rules = []
    for g in [*s.groups, *([s.mtp] if s.mtp is not None else [])]:
        bits, size = map(int, chosen[g.name].split("/"))
        rules += [Rule(re.compile(f"^{re.escape(m)}$"), bits, size) for m in g.modules]
    common = max(set(chosen.values()), key=list(chosen.values()).count)
    bits, size = map(int, common.split("/"))
    return Recipe(
        name="auto",
        bits=bits,
        group_size=size,
        rules=tuple(rules),
        description=(
            f"sensitivity-guided for {bits_per_weight:g} bits per weight, predicted KL "
            f"{sum(g.kl(chosen[g.name]) for g in s.groups):.5f} (source {s.source_digest})"
        ),
    )
