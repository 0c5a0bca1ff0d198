"""Measured quality: how far a model's next-token distributions are from its source's.

`measure_quality(model, reference)` scores a converted model (or a bundle) against the
checkpoint it came from on held-out text, token by token: KL(reference ‖ model) of the full
distributions, argmax agreement, both perplexities and both MTP heads' greedy acceptance.

How it runs, so that a 9B and its source never sit in memory together:
1. the text is cut into windows of `window` tokens (each run from an empty state, every
   position after the first scored);
2. the reference runs first (float32 by default: `load_model(dtype=mx.float32)`, the
   reference-exact model) and its logits for every scored position go, window by window,
   into a temporary float32 file (`np.memmap`); then it is released;
3. the model runs as it would on a device (weights and activations as stored; with
   `kv_bits`, on a quantized KV cache, every position attending to the quantized keys and
   values of those before it and its own, as prefill and decoding read them) and each
   window's logits are compared with the reference's, read back from the file.
   Its quantized matmuls sum in float32 (`accumulation="float32"`, the default), as MLX's
   Metal kernels do with bfloat16 inputs (mlx/backend/metal/kernels/quantized.h,
   `qmv_fast_impl` and its kin: `typedef float U` accumulators, the result cast back to the
   input's dtype): what a Mac's GPU or an iPhone computes. MLX's CPU backend sums bfloat16
   inputs in bfloat16, an error of its own that grows with a matrix's width and is no part
   of what quantization costs on a device (micro, code set: uniform 8-bit at group 32 agrees
   on 94.1 % of top-1 tokens summed in bfloat16, 98.4 % summed in float32, as much as the
   unquantized bf16 model; benchmarks/results/quality.md, 2026-12-08). `accumulation="native"`
   measures the model as this machine's backend runs it.
The file holds the reference's logits rather than its log-probabilities: both sides' log-softmax
is then taken in float64 from exactly the numbers each model produced, so KL, top-1 and
perplexity are exact for those logits (log-probabilities rounded to float32 would move a KL of
0.03 by ~1e-5 relative). It needs 4 × vocabulary bytes per scored token (the real models'
248,320 entries: 1 MB a token), checked against the free space first.

The built-in evaluation set (`mlxkit/data/eval/`, provenance and licences in its README) is
disjoint from micro's training corpus and from any calibration text; `text_digest` names the
texts a result was measured on.

Results on the built-in set are kept (`cache_dir()`, beside the sensitivity measurements) under
the reference checkpoint's digest and the model's quantization (`quantization_key`), so that the
planner, which knows both before anything is converted, can print a measured figure for the
recipe it picks rather than a predicted one, and a bundle's manifest can carry it
(`quality_block`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxkit.cache import KVQuantization, kv_quantization
from mlxkit.checkpoint import INDEX, read_config, read_headers, read_json_object, weight_files
from mlxkit.errors import CheckpointError, ConfigError, MlxkitError
from mlxkit.fields import local_path, shown
from mlxkit.load import load_config, load_model, resolve_model_dir
from mlxkit.models.qwen3_5 import Model
from mlxkit.tokenizer import Tokenizer, load_tokenizer

EVAL_DIR = Path(__file__).resolve().parent / "data" / "eval"
# The built-in evaluation set: set name -> its files (.txt: one text each; .jsonl: one
# conversation a line, rendered by the model's chat template).
BUILTIN_SETS: dict[str, tuple[str, ...]] = {
    "code": ("code_json_decoder.txt", "code_listobject_h.txt"),
    "prose": ("prose_objects.txt", "prose_naming.txt"),
    "languages": (
        "languages_zh_hans.txt",
        "languages_zh_hant.txt",
        "languages_ja.txt",
        "languages_ko.txt",
    ),
    "chat": ("chat.jsonl",),
    "tools": ("tools.jsonl",),
}
DEFAULT_WINDOW = 256
MAX_WINDOW = 8192  # one window's logits are window × vocabulary floats on each side
REFERENCE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
# how the model's quantized matmuls sum (module docstring): as Apple GPUs do, or as this
# machine's MLX backend does; kept results are float32's (the device's figures)
ACCUMULATIONS = ("float32", "native")
MAX_INPUT_BYTES = 1 << 26  # a --text / --chat file
ROWS = 64  # positions per float64 block: bounds numpy's temporaries to ROWS × vocabulary
BATCH_BYTES = 1 << 28  # the most logits one batch of windows may make
MAX_BATCH = 64


@dataclass
class SetQuality:
    """The figures of one evaluation set (code, prose, ...)."""

    tokens: int
    kl_mean: float
    top1: float
    ppl: float
    ppl_reference: float


@dataclass
class QualityResult:
    """KL(reference ‖ model) in nats per scored token (mean and 99th percentile), argmax
    agreement, perplexities on the text, greedy one-draft MTP acceptance of each model (None
    without an MTP head) and the model's text-model weights (embeddings, layers, norm, head;
    scales and biases included; MTP and vision excluded), counted as mlx-lm counts bits per
    weight. `sets` breaks the figures down by evaluation set. `kv_cache`: the model ran on a
    quantized KV cache (None: in its activation dtype)."""

    kl_mean: float
    kl_p99: float
    top1: float
    ppl: float
    ppl_reference: float
    mtp_acceptance: float | None
    mtp_acceptance_reference: float | None
    tokens: int
    windows: int
    window: int
    weight_bytes: int
    bits_per_weight: float
    reference_dtype: str
    text_digest: str
    sets: dict[str, SetQuality]
    kv_cache: dict | None = None  # the model's KV quantization: bits, group_size, start
    accumulation: str = "float32"  # how its quantized matmuls summed (ACCUMULATIONS)

    def to_dict(self) -> dict:
        return asdict(self)


# --- texts ------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    """A user's text file (UTF-8), for `text=`."""
    return _read_input(path, "--text")


def read_chat(path: str | Path) -> list[dict]:
    """A user's conversations, one JSON object a line ({"messages": [...], "tools": [...]}),
    for `chat=`."""
    data = _read_input(path, "--chat")
    conversations = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            conversations.append(json.loads(line))
        except ValueError as e:
            raise ConfigError(f"{path}: line {n} is not JSON ({e}); write one object a line")
    _check_conversations(conversations, str(path))
    return conversations


def _read_input(path: str | Path, flag: str) -> str:
    p = local_path(path, flag)
    try:
        if not p.is_file():
            raise ConfigError(f"{flag} {p}: not a file; pass a UTF-8 text file")
        if p.stat().st_size > MAX_INPUT_BYTES:
            raise ConfigError(f"{flag} {p}: larger than {MAX_INPUT_BYTES >> 20} MiB; pass less")
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {p}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {p}: not UTF-8 text (byte {e.start}); pass a UTF-8 file")


def _check_conversations(conversations: object, where: str) -> None:
    """Each conversation: {"messages": [{"role": str, ...}, ...]} with an optional "tools"
    list; the chat template checks the rest."""
    if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)):
        raise ConfigError(f"chat must be a list of conversations, got {shown(conversations)}")
    if not conversations:
        raise ConfigError(f"{where}: no conversations; pass at least one")
    for n, c in enumerate(conversations, 1):
        messages = c.get("messages") if isinstance(c, Mapping) else None
        tools = c.get("tools") if isinstance(c, Mapping) else None
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise ConfigError(
                f'{where}: conversation {n} is not {{"messages": [{{"role": ..., '
                '"content": ...}, ...]}'
            )
        if tools is not None and not isinstance(tools, list):
            raise ConfigError(f'{where}: conversation {n} has "tools" that is not a list')


def _builtin_texts(tokenizer: Tokenizer) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for name, files in BUILTIN_SETS.items():
        texts[name] = []
        for f in files:
            data = (EVAL_DIR / f).read_text(encoding="utf-8")
            if f.endswith(".jsonl"):
                conversations = [json.loads(line) for line in data.splitlines() if line]
                texts[name] += _rendered(tokenizer, conversations)
            else:
                texts[name].append(data)
    return texts


def _rendered(tokenizer: Tokenizer, conversations: Sequence[Mapping]) -> list[str]:
    """Whole conversations as the model's chat template writes them (no generation prompt)."""
    return [
        tokenizer.apply_chat_template(
            list(c["messages"]), add_generation_prompt=False, tools=c.get("tools")
        )
        for c in conversations
    ]


def _texts(
    tokenizer: Tokenizer, text: str | None, chat: Sequence[Mapping] | None
) -> dict[str, list[str]]:
    """Set name -> texts: the user's (text and/or chat), else the built-in set."""
    if text is None and chat is None:
        return _builtin_texts(tokenizer)
    texts = {}
    if text is not None:
        if not isinstance(text, str):
            raise ConfigError(f"text must be a string, got {shown(text)}")
        texts["text"] = [text]
    if chat is not None:
        _check_conversations(chat, "chat")
        texts["chat"] = _rendered(tokenizer, chat)
    return texts


def _digest(texts: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


# --- windows ----------------------------------------------------------------------------------


@dataclass
class _Window:
    set: str
    tokens: list[int]
    row: int  # where its scored positions start in the reference file

    @property
    def scored(self) -> int:
        return len(self.tokens) - 1


def _windows(ids: dict[str, list[int]], window: int, max_tokens: int | None) -> list[_Window]:
    """Each set's token stream cut into windows of `window` tokens (a shorter last one when it
    has 2 tokens or more), taken from the sets in turn so that `max_tokens` keeps every kind of
    text; the last window taken is shortened to end at exactly `max_tokens` scored tokens."""
    pieces = {
        name: [s[i : i + window] for i in range(0, len(s), window) if len(s) - i >= 2]
        for name, s in ids.items()
    }
    order = [
        (name, p[k])
        for k in range(max(map(len, pieces.values()), default=0))
        for name, p in pieces.items()
        if k < len(p)
    ]
    windows, row = [], 0
    for name, tokens in order:
        if max_tokens is not None:
            tokens = tokens[: max_tokens - row + 1]
            if len(tokens) < 2:
                break
        windows.append(_Window(name, tokens, row))
        row += len(tokens) - 1
    return windows


# --- running a model --------------------------------------------------------------------------


def _batches(windows: list[_Window], vocab: int) -> list[list[_Window]]:
    """Windows of one length run together: on a CPU the Gated-DeltaNet recurrence costs per
    step, not per window. A batch's logits stay within BATCH_BYTES (one window at a time for
    the real models' vocabulary)."""
    by_length: dict[int, list[_Window]] = {}
    for w in windows:
        by_length.setdefault(len(w.tokens), []).append(w)
    batches = []
    for length, same in by_length.items():
        size = max(1, min(MAX_BATCH, BATCH_BYTES // (length * vocab * 4)))
        batches += [same[i : i + size] for i in range(0, len(same), size)]
    return batches


def _run_batch(
    model: Model, batch: list[_Window], what: str, kv: KVQuantization | None = None
) -> tuple[np.ndarray, int]:
    """Logits at the scored positions of windows of one length, [B, L-1, V] (float32, as the
    model made them), and how many of the MTP head's greedy drafts (from h_i and token i+1)
    equal the main model's argmax at i+1: the drafts that greedy speculative decoding with one
    draft accepts (0 without an MTP head). `kv`: through fresh caches kept quantized (the
    main model's and the MTP head's), as decoding keeps them."""
    ids = mx.array([w.tokens for w in batch])
    hidden = model.hidden(ids, model.make_cache(kv) if kv is not None else None)
    logits = model.logits(hidden)
    finite = mx.isfinite(logits).all()
    accepted = mx.array(0)
    if model.has_mtp:
        mtp_cache = model.make_mtp_cache(kv) if kv is not None else None
        drafts, _ = model.mtp_forward(hidden[:, :-1], ids[:, 1:], mtp_cache)
        accepted = (drafts.argmax(-1) == logits[:, 1:].argmax(-1)).sum()
    scored = logits[:, :-1].astype(mx.float32)
    mx.eval(scored, accepted, finite)
    if not finite.item():
        raise MlxkitError(
            f"the {what} produced non-finite logits (NaN or inf): its weights are broken "
            "(check it with `mlxkit info`, or convert it again)"
        )
    return np.asarray(scored), accepted.item()


@contextmanager
def _progress(batches: list[list[_Window]], label: str, quiet: bool) -> Iterator:
    """The batches, with a bar of windows on stderr when it is a terminal (as `convert` shows
    one)."""
    if quiet or not sys.stderr.isatty():
        yield iter(batches)
        return
    import click

    with click.progressbar(
        length=sum(map(len, batches)), label=label, file=sys.stderr, show_percent=True
    ) as bar:

        def advancing() -> Iterator[list[_Window]]:
            for batch in batches:
                yield batch
                bar.update(len(batch))

        yield advancing()


def _reference_pass(
    path: str | Path, dtype: mx.Dtype, batches: list[list[_Window]], store: np.memmap, quiet: bool
) -> int | None:
    """Runs the reference over every window into `store`; returns its accepted drafts (None
    without an MTP head). The model lives only inside this call."""
    model = load_model(path, dtype=dtype)
    accepted = 0
    with _progress(batches, "reference", quiet) as items:
        for batch in items:
            logits, n = _run_batch(model, batch, "reference")
            for w, rows in zip(batch, logits):
                store[w.row : w.row + w.scored] = rows
            accepted += n
    store.flush()
    return accepted if model.has_mtp else None


@dataclass
class _Scores:
    """Per scored position: KL(reference ‖ model), argmax agreement, and the negative
    log-likelihood of the text's next token under the model and under the reference."""

    kl: np.ndarray
    agree: np.ndarray
    nll: np.ndarray
    nll_reference: np.ndarray

    @classmethod
    def joined(cls, parts: list[_Scores]) -> _Scores:
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__)
        )


def _compare(reference: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> _Scores:
    """The scores of logits [N, V] against the reference's [N, V], in float64 blocks of ROWS
    positions."""
    parts = []
    for s in range(0, len(targets), ROWS):
        r = _log_softmax(np.asarray(reference[s : s + ROWS], dtype=np.float64))
        m = _log_softmax(np.asarray(logits[s : s + ROWS], dtype=np.float64))
        rows, t = np.arange(len(r)), targets[s : s + ROWS]
        kl = (np.exp(r) * (r - m)).sum(-1)
        parts.append(_Scores(kl, r.argmax(-1) == m.argmax(-1), -m[rows, t], -r[rows, t]))
    return _Scores.joined(parts)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class _Float32Sums(nn.Module):
    """A quantized linear or embedding whose matmuls take float32 inputs, so that they sum in
    float32 as MLX's Metal kernels do, and give back the input's dtype (module docstring)."""

    def __init__(self, quantized: nn.QuantizedLinear | nn.QuantizedEmbedding) -> None:
        super().__init__()
        self.quantized = quantized

    def _matmul(self, x: mx.array) -> mx.array:
        q = self.quantized
        return mx.quantized_matmul(
            x.astype(mx.float32),
            q["weight"],
            q["scales"],
            q.get("biases"),
            transpose=True,
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
        )

    def __call__(self, x: mx.array) -> mx.array:
        if isinstance(self.quantized, nn.QuantizedEmbedding):
            return self.quantized(x)
        y = self._matmul(x)
        return (y + self.quantized["bias"] if "bias" in self.quantized else y).astype(x.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._matmul(x).astype(x.dtype)


def sum_in_float32(model: nn.Module) -> None:
    """Makes every quantized linear and embedding of `model` sum in float32 (`_Float32Sums`)."""
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(
        tree_unflatten([(p, _Float32Sums(m)) for p, m in leaves if isinstance(m, quantized)])
    )


def _model_pass(
    path: str | Path,
    batches: list[list[_Window]],
    store: np.memmap,
    quiet: bool,
    kv: KVQuantization | None,
    accumulation: str,
) -> tuple[_Scores, int | None, int, float]:
    """Runs the model over every window (on a KV cache kept as `kv` says, its quantized
    matmuls summing as `accumulation` says), comparing with the reference's logits read back
    from `store`: the scores (in window order), its accepted drafts (None without an MTP
    head), its weight bytes and bits per weight."""
    model = load_model(path)
    if accumulation == "float32":
        sum_in_float32(model)
    parts, accepted = [], 0
    with _progress(batches, "model", quiet) as items:
        for batch in items:
            logits, n = _run_batch(model, batch, "model", kv)
            for w, rows in zip(batch, logits):
                targets = np.array(w.tokens[1:])
                parts.append((w.row, _compare(store[w.row : w.row + w.scored], rows, targets)))
            accepted += n
    in_order = [scores for _, scores in sorted(parts, key=lambda part: part[0])]
    return _Scores.joined(in_order), accepted if model.has_mtp else None, *weight_bits(model)


def weight_bits(model: Model) -> tuple[int, float]:
    """Bytes and bits per weight of the text model (embeddings, layers, norm, head), as mlx-lm
    counts them: every array's bytes (scales and biases included) over the parameters the
    unquantized layers would have."""
    text = model.language_model
    nbytes = sum(v.nbytes for _, v in tree_flatten(text.parameters()))
    leaves = tree_flatten(text.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))

    def params(m: nn.Module) -> int:
        if hasattr(m, "bits"):
            return m.weight.size * 32 // m.bits + (m.bias.size if "bias" in m else 0)
        return sum(v.size for _, v in tree_flatten(m.parameters()))

    return nbytes, nbytes * 8 / sum(params(m) for _, m in leaves)


# --- measure_quality --------------------------------------------------------------------------


def measure_quality(
    model_path: str | Path,
    reference_path: str | Path,
    *,
    text: str | None = None,
    chat: Sequence[Mapping] | None = None,
    window: int = DEFAULT_WINDOW,
    max_tokens: int | None = None,
    reference_dtype: str = "float32",
    tmp_dir: str | Path | None = None,
    quiet: bool = False,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    accumulation: str = "float32",
    keep: bool = False,
) -> QualityResult:
    """The quality of `model_path` (a converted model directory or a bundle) against
    `reference_path` (its source checkpoint), on `text` and/or `chat` (conversations:
    {"messages": [...], "tools": [...]}, rendered by the model's chat template) or, with
    neither, the built-in evaluation set. `max_tokens` caps the scored tokens (windows taken
    from every set in turn). `reference_dtype` "bfloat16" halves the reference's memory at
    the cost of its exactness. The reference's logits wait in a temporary file in `tmp_dir`
    (default: the system's). Unless `quiet`, a progress bar on a terminal's stderr. `kv_bits`,
    `kv_group_size`, `quantized_kv_start`: the model runs on a quantized KV cache, as
    stream_generate's options of those names keep it (the reference never does), so that the
    KL says what the cache costs on top of the weights. `accumulation`: "float32" (the
    model's quantized matmuls sum as on Apple GPUs) or "native" (as this machine's MLX backend
    sums them). `keep`: a result on the built-in set (float32 reference, default window, no
    KV quantization, float32 sums) is kept where the planner finds it (`mlxkit eval` keeps
    it). See the module docstring for what is measured and how."""
    _check_options(window, max_tokens, reference_dtype)
    if accumulation not in ACCUMULATIONS:
        raise ConfigError(
            f"accumulation must be one of {', '.join(ACCUMULATIONS)}, got {shown(accumulation)}"
        )
    head_dim = load_config(resolve_model_dir(model_path)).head_dim
    kv = kv_quantization(kv_bits, kv_group_size, quantized_kv_start, head_dim)
    tokenizer, vocab = _tokenizer_and_vocab(model_path, reference_path)
    texts = _texts(tokenizer, text, chat)
    ids = {name: [t for s in items for t in tokenizer.encode(s)] for name, items in texts.items()}
    _check_same_tokens(reference_path, texts, ids)
    windows = _windows(ids, window, max_tokens)
    if not windows:
        raise ConfigError("the text has fewer than 2 tokens: nothing to score; pass more text")
    rows = windows[-1].row + windows[-1].scored
    folder = local_path(tmp_dir if tmp_dir is not None else tempfile.gettempdir(), "tmp_dir")
    _check_space(folder, rows * vocab * 4)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="mlxkit-eval-", suffix=".f32") as f:
        store = np.memmap(f.name, dtype=np.float32, mode="w+", shape=(rows, vocab))
        batches = _batches(windows, vocab)
        ref_accepted = _reference_pass(
            reference_path, REFERENCE_DTYPES[reference_dtype], batches, store, quiet
        )
        mx.clear_cache()  # the reference's buffers, before the model is loaded
        scores, accepted, nbytes, bpw = _model_pass(
            model_path, batches, store, quiet, kv, accumulation
        )
        del store
    result = _result(
        scores, windows, window, (accepted, ref_accepted), nbytes, bpw, reference_dtype, texts
    )
    result.accumulation = accumulation
    if kv is not None:
        result.kv_cache = {"bits": kv.bits, "group_size": kv.group_size, "start": kv.start}
    elif (
        keep
        and accumulation == "float32"
        and text is None
        and chat is None
        and (reference_dtype, window)
        == (
            "float32",
            DEFAULT_WINDOW,
        )
    ):
        _store(result, reference_path, model_path)
    return result


def _check_options(window: object, max_tokens: object, reference_dtype: object) -> None:
    if not _is_int(window) or not 2 <= window <= MAX_WINDOW:
        raise ConfigError(f"window must be an integer from 2 to {MAX_WINDOW}, got {shown(window)}")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ConfigError(f"max_tokens must be a positive integer, got {shown(max_tokens)}")
    if not isinstance(reference_dtype, str) or reference_dtype not in REFERENCE_DTYPES:
        raise ConfigError(
            f"reference_dtype must be one of {', '.join(REFERENCE_DTYPES)}, "
            f"got {shown(reference_dtype)}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokenizer_and_vocab(model_path: str | Path, reference_path: str | Path):
    """The model's tokenizer and the logits' width, once both configs agree on it (before any
    weight is read)."""
    model_dir, reference_dir = resolve_model_dir(model_path), resolve_model_dir(reference_path)
    vocab = load_config(model_dir).vocab_size
    reference_vocab = load_config(reference_dir).vocab_size
    if vocab != reference_vocab:
        raise CheckpointError(
            f"{model_path} has a vocabulary of {vocab:,} and {reference_path} of "
            f"{reference_vocab:,}: compare a model with the checkpoint it was converted from"
        )
    return load_tokenizer(model_dir), vocab


def _check_same_tokens(
    reference_path: str | Path, texts: dict[str, list[str]], ids: dict[str, list[int]]
) -> None:
    reference = load_tokenizer(resolve_model_dir(reference_path))
    for name, items in texts.items():
        if [t for s in items for t in reference.encode(s)] != ids[name]:
            raise CheckpointError(
                f"{reference_path} tokenizes the evaluation text ({name}) differently from the "
                "model: compare a model with the checkpoint it was converted from"
            )


def _check_space(folder: Path, needed: int) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a directory; pass an existing folder for the temp file")
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(
            f"the reference's logits need {needed / 1e9:.2f} GB in {folder} and "
            f"{free / 1e9:.2f} GB are free: pass fewer tokens (max_tokens, --max-tokens) or "
            "another folder (tmp_dir, TMPDIR)"
        )


def _result(
    scores: _Scores,
    windows: list[_Window],
    window: int,
    accepted: tuple[int | None, int | None],
    nbytes: int,
    bpw: float,
    reference_dtype: str,
    texts: dict[str, list[str]],
) -> QualityResult:
    drafts = sum(w.scored for w in windows)  # one draft per scored position
    names = np.array([w.set for w in windows for _ in range(w.scored)])
    sets = {}
    for name in texts:
        at = names == name
        if at.any():
            sets[name] = SetQuality(
                tokens=int(at.sum()),
                kl_mean=float(scores.kl[at].mean()),
                top1=float(scores.agree[at].mean()),
                ppl=math.exp(scores.nll[at].mean()),
                ppl_reference=math.exp(scores.nll_reference[at].mean()),
            )
    return QualityResult(
        kl_mean=float(scores.kl.mean()),
        kl_p99=float(np.percentile(scores.kl, 99)),
        top1=float(scores.agree.mean()),
        ppl=math.exp(scores.nll.mean()),
        ppl_reference=math.exp(scores.nll_reference.mean()),
        mtp_acceptance=None if accepted[0] is None else accepted[0] / drafts,
        mtp_acceptance_reference=None if accepted[1] is None else accepted[1] / drafts,
        tokens=len(scores.kl),
        windows=len(windows),
        window=window,
        weight_bytes=nbytes,
        bits_per_weight=bpw,
        reference_dtype=reference_dtype,
        text_digest=_digest(texts),
        sets=sets,
    )


# --- kept results -----------------------------------------------------------------------------


def checkpoint_digest(directory: str | Path) -> str:
    """A digest of a checkpoint cheap enough for a 9B: its config.json, every tensor's name,
    dtype and shape, and the first 4 KiB of its bytes (the weights are never read whole). The
    sensitivity measurement (convert/sensitivity.py) is kept under it too."""
    model_dir = resolve_model_dir(directory)
    h = hashlib.sha256(json.dumps(read_config(model_dir), sort_keys=True).encode())
    tensors = read_headers(weight_files(model_dir))
    for name in sorted(tensors):
        info = tensors[name]
        h.update(f"{name} {info.dtype} {info.shape}".encode())
        with open(info.file, "rb") as f:
            f.seek(info.start)
            h.update(f.read(min(4096, info.end - info.start)))
    return h.hexdigest()[:16]


def quantization_key(quantization: Mapping | None, dtype: str, rounding: str = "nearest") -> str:
    """What a text model's weights are, in a few characters: its config.json `quantization`
    block (mlx-lm's: defaults plus one entry per module that differs), kept to the text model's
    entries (the KL is the text model's: the vision tower and the drafter do not change it), the
    dtype of everything not quantized, and how the weights were rounded (`convert --rounding`;
    nearest rounding's keys are those kept before GPTQ existed)."""
    block = {
        k: v
        for k, v in (quantization or {}).items()
        if not isinstance(v, Mapping) or k.startswith("language_model.")
    }
    fields = {"quantization": block, "dtype": dtype}
    if rounding != "nearest":
        fields["rounding"] = rounding
    data = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def model_quantization_key(model_path: str | Path) -> str:
    """`quantization_key` of a converted model directory (or a bundle's model/): its config's
    block, the dtype its final norm is stored in and the rounding its index records."""
    model_dir = resolve_model_dir(model_path)
    config = read_config(model_dir)
    norm = read_headers(weight_files(model_dir)).get("language_model.model.norm.weight")
    dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(
        norm.dtype if norm else "", "bfloat16"
    )
    return quantization_key(config.get("quantization"), dtype, model_rounding(model_dir))


def model_rounding(model_path: str | Path) -> str:
    """How a converted model's weights were rounded: the `rounding` its safetensors index
    records (`convert --rounding gptq` writes it; config.json's quantization block is the same
    for every rounding), "nearest" where it records none."""
    metadata = (read_json_object(resolve_model_dir(model_path), INDEX) or {}).get("metadata")
    rounding = metadata.get("rounding", "nearest") if isinstance(metadata, dict) else "nearest"
    return str(rounding)


def cache_dir() -> Path:
    """Where measured results are kept: $XDG_CACHE_HOME/mlxkit/quality (else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlxkit" / "quality"


def _store(result: QualityResult, reference_path: str | Path, model_path: str | Path) -> None:
    """Keeps a result on the built-in set (float32 reference, default window, no KV
    quantization) for the planner; a cache that cannot be written is skipped silently: the
    measurement itself was returned."""
    from mlxkit import __version__

    try:
        key = f"{checkpoint_digest(reference_path)}-{model_quantization_key(model_path)}"
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}-{result.text_digest[:16]}-{result.tokens}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mlxkit_version": __version__, **result.to_dict()}))
        tmp.replace(path)
    except (OSError, MlxkitError):
        pass


def cached_quality(source_digest: str, key: str) -> dict | None:
    """The newest kept result (as `QualityResult.to_dict()`, plus `mlxkit_version`) of a model
    with quantization `key` measured against the checkpoint of `source_digest`; None if none."""
    found = sorted(
        cache_dir().glob(f"{source_digest}-{key}-*.json"), key=lambda p: -p.stat().st_mtime
    )
    for path in found:
        try:
            data = json.loads(path.read_text())
            # results kept before `accumulation` existed summed as the machine's backend did
            if (
                isinstance(data, dict)
                and isinstance(data.get("kl_mean"), float)
                and data.get("accumulation") == "float32"
            ):
                return data
        except (OSError, ValueError):
            continue
    return None


def quality_block(
    measured: Mapping | None,
    predicted: float | None = None,
    calibration: Mapping | None = None,
    rounding: str = "nearest",
) -> dict | None:
    """The `quality` a plan carries and a bundle's manifest records: a measured result's
    figures (`measured`: `QualityResult.to_dict()` of the built-in set, of weights rounded as
    `rounding` says), or else the KL predicted from the sensitivity measurement (`calibration`:
    its `tokens` and `digest`), or None when neither is known. `eval_set_digest` names the text
    the figures are from, `rounding` the weights they are of: a prediction is always nearest
    rounding's (the sensitivity measures plain rounding; learned rounding is only measured)."""
    from mlxkit import __version__

    if measured is not None:
        return {
            "method": "measured",
            "rounding": rounding,
            "kl_mean": measured["kl_mean"],
            "kl_p99": measured["kl_p99"],
            "top1": measured["top1"],
            "ppl": measured["ppl"],
            "tokens": measured["tokens"],
            "eval_set_digest": measured["text_digest"],
            "mlxkit_version": measured.get("mlxkit_version", __version__),
        }
    if predicted is None or calibration is None:
        return None
    return {
        "method": "predicted",
        "rounding": "nearest",
        "kl_mean": predicted,
        "kl_p99": None,
        "top1": None,
        "ppl": None,
        "tokens": calibration["tokens"],
        "eval_set_digest": calibration["digest"],
        "mlxkit_version": __version__,
    }


# --- output -----------------------------------------------------------------------------------


def json_output(path: str | Path) -> Path:
    """Where `--json` writes, checked before the measurement starts rather than after it."""
    p = local_path(path, "--json")
    if p.is_dir():
        raise ConfigError(f"--json {p}: is a directory; pass a file name")
    if not p.parent.is_dir():
        raise ConfigError(f"--json {p}: folder {p.parent} does not exist; create it first")
    return p


def format_quality(result: QualityResult, model: str, reference: str) -> str:
    """The report `mlxkit eval` prints."""
    from mlxkit.info import human_bytes

    r = result

    def mtp(value: float | None) -> str:
        return "no MTP head" if value is None else f"{value:.1%}"

    sums = {"float32": "quantized matmuls summed in float32, as on Apple GPUs"}
    sums = sums.get(r.accumulation, "quantized matmuls summed as this machine's MLX backend does")
    head = f"{model} against {reference} ({r.reference_dtype} reference; {sums})"
    weights = f"{human_bytes(r.weight_bytes)}, {r.bits_per_weight:.2f} bits per weight"
    lines = [
        f"{head}: {r.tokens:,} tokens in {r.windows} window{'s' * (r.windows != 1)} "
        + f"of up to {r.window}",
        f"KL(reference ‖ model)  mean {r.kl_mean:.5f} nats/token, p99 {r.kl_p99:.5f}",
        f"top-1 agreement        {r.top1:.1%}",
        f"perplexity             {r.ppl:.3f} (reference {r.ppl_reference:.3f})",
        f"MTP acceptance         {mtp(r.mtp_acceptance)} "
        + f"(reference {mtp(r.mtp_acceptance_reference)}), greedy, 1 draft",
        f"weights                {weights} (text model)",
    ]
    if r.kv_cache is not None:
        kv = r.kv_cache
        lines.append(
            f"KV cache               {kv['bits']}-bit, groups of {kv['group_size']}, "
            f"quantized from position {kv['start']}"
        )
    if len(r.sets) > 1:
        lines.append("by set                tokens  KL mean   top-1   perplexity (reference)")
        lines += [
            f"  {name:<18}{s.tokens:>8,}  {s.kl_mean:.5f}  {s.top1:6.1%}   {s.ppl:.3f} "
            f"({s.ppl_reference:.3f})"
            for name, s in r.sets.items()
        ]
    return "\n".join(lines)
