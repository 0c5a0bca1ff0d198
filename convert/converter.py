"""`convert()`: one Qwen 3.5 checkpoint in, one MLX model directory out.

The pass is streaming: for each model parameter, in the order of `planned_tensors`, rows
are read from a memory map in chunks, turned into our layout by `checkpoint_tensor`,
quantized by the recipe's rule, and written to their planned place in the output shards.
The vision tower goes the same way (kept unless `vision=False`, in the output dtype unless
`vision_bits` is given), with its config, token ids and preprocessor configs.
Each chunk is evaluated and dropped before the next, so peak memory is a few chunks plus
the interpreter, whatever the model size.

OUT is assembled in a hidden sibling directory and swapped into place only when complete;
on any error or Ctrl-C the sibling is removed (`output.py` has the rules for what may be
replaced, and what a kill leaves). Every chunk is checked for NaN and infinity on its way
through: a corrupt checkpoint stops the run instead of becoming a model that prints noise.
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import click
import mlx.core as mx

from mlxkit import __version__
from mlxkit import draft_vocab as shortlist_file
from mlxkit.checkpoint import INDEX, TensorInfo, model_file, read_json, read_tokenizer_files
from mlxkit.errors import CheckpointError, ConfigError, MlxkitError
from mlxkit.fields import boolean, local_path
from mlxkit.info import human_bytes
from mlxkit.layout import (
    OUTPUT_DTYPES,
    PlannedTensor,
    bytes_by_part,
    checkpoint_tensor,
    drafter_key,
    model_parameters,
    planned_tensors,
    weight_rule,
)
from mlxkit.load import MTP_DIR
from mlxkit.models.qwen3_5_vision import VisionConfig
from mlxkit.source import Size, Source, local_source, resolve_source
from mlxkit.vision import PREPROCESSOR_FILES

from . import shortlist
from .output import (
    OutputError,
    assembling,
    check_apart_from_source,
    check_destination,
    replace_dir,
)
from .quantize import Recipe, check_vision_bits, load_recipe, quantize
from .reader import SourceCheckpoint, as_stored_dtype, read_raw_rows, row_chunks
from .writer import MX_DTYPES, ShardedWriter

if TYPE_CHECKING:
    from .rounding import Rounded

# A library call logs its summary here and prints nothing; `mlxkit convert` prints the
# summary of the result it gets back.
log = logging.getLogger("mlxkit.convert")

CHUNK_BYTES = 32 << 20  # source bytes per chunk: large enough for fast I/O, small for RSS
READ_AHEAD = 2  # chunks read ahead of, and waiting to be written behind, the one quantized
DISK_MARGIN = 64 << 20
CONFIG = "config.json"
SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
# Copied verbatim when present: what tokenizers and generation need.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# What mlx-vlm's drafter splitter copies into a drafter directory.
DRAFTER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# How the MTP head is stored in <dst>/mtp/ (see _write_drafter_config for the configs):
# - "mlx-vlm": the drafter mlx-vlm's `split_mtp` writes: names without the `mtp.` prefix,
#   norms converted (1 + w), safetensors `format: mlx`. mlx-vlm's qwen3_5_mtp `sanitize`
#   adds 1 to the norms of `mtp.`-prefixed names only, and no tensor under OUT is named
#   `mtp.*` (an mlx-swift-lm that gathers a model directory's safetensors recursively would
#   otherwise see them and re-shift the main model's norms).
# - "checkpoint": the head as the Hugging Face checkpoint stores it (names `mtp.*`, norms w
#   for x·(1 + w), `format: pt`), quantized, in a directory whose config says qwen3_5. That
#   is what mlx-swift-lm's text drafter registered for qwen3_5 reads (it keeps only `mtp.`
#   names and adds 1 to the norms), and mlx-vlm reads it through its native-checkpoint
#   splitter (same rule). iPhone bundles ship this one.
DRAFTER_LAYOUTS = ("mlx-vlm", "checkpoint")


@dataclass
class ConvertResult:
    output: Path
    mtp_dir: Path | None
    bytes_by_part: dict[str, int]  # embeddings / layers / mtp / vision
    bits_per_weight: float  # of the main model (embeddings + layers), as mlx-lm reports it
    seconds: float
    peak_memory: int  # peak resident memory of this process, bytes
    tensors: int
    quantization: dict | None = field(default=None)
    sensitivity: str | None = None  # with --recipe auto: what was measured, and its cost
    rounding: str | None = None  # with --rounding gptq: what it rounded, and its cost
    draft_vocab: shortlist.Shortlist | None = None  # with --draft-vocab N

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_part.values())


def convert(
    src: str | Path | Source | Size,
    dst: str | Path | None = None,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str = "uniform",
    bits_per_weight: float | None = None,
    dtype: str = "bfloat16",
    quantize: bool = True,
    mtp: bool = True,
    vision: bool = True,
    vision_bits: int | None = None,
    draft_vocab: int | None = None,
    drafter_layout: str = "mlx-vlm",
    rounding: str = "nearest",
    force: bool = False,
    quiet: bool = False,
) -> ConvertResult:
    """Converts `src` (a checkpoint directory in the Hugging Face layout, or a size name
    such as "2b") into the MLX model directory `dst` (default: a name such as
    `Qwen3.5-2B-4bit` in the current directory).

    bits / group_size default to the recipe's (4 / 64 for the shipped recipes). Recipe "auto"
    measures the checkpoint's sensitivity (convert/sensitivity.py; cached) and spends
    `bits_per_weight` (default 4.5) where it lowers the predicted KL most; `dtype` is
    the dtype of everything not quantized. With `mtp`, the MTP head is written as a drafter
    in `dst/mtp/`, in one of DRAFTER_LAYOUTS. With `vision` the checkpoint's vision tower is
    kept (in `dtype`; its linear layers quantized to `vision_bits` when given). With
    `draft_vocab` N, the drafter gets the shortlist of N tokens it drafts over
    (convert/shortlist.py; it loads the tokenizer: Qwen's adds ~100 MB of peak memory).
    `rounding` "gptq" rounds the decoder layers' linears by GPTQ on the calibration set
    (convert/rounding.py: its cost in time and memory) instead of to the nearest level. Unless
    `quiet`, shows a progress bar on a terminal's stderr and logs the summary (INFO, logger
    "mlxkit.convert"); nothing goes to stdout. Raises MlxkitError for every problem a user
    can cause."""
    t0 = time.perf_counter()
    _check_options(dtype, drafter_layout, quantize, mtp, vision, force, bits, group_size)
    _check_rounding(rounding, quantize)
    auto = _check_auto(recipe, bits_per_weight, bits, group_size, quantize)
    the_recipe = (
        None if auto else _checked_recipe(recipe, bits, group_size, quantize, vision, vision_bits)
    )
    source = _source(src, dst, force)
    ckpt = SourceCheckpoint.open(source.directory, include_mtp=mtp, include_vision=vision)
    _check_side_files(source.directory)
    chosen = _shortlist(ckpt, draft_vocab)
    sensitivity = None
    if auto:
        the_recipe, sensitivity = _auto_recipe(source.directory, bits_per_weight, dtype)
        _checked_recipe("uniform", None, None, quantize, vision, vision_bits)  # --vision-bits
    planned = planned_tensors(
        ckpt.cfg,
        the_recipe,
        include_mtp=ckpt.has_mtp,
        dtype=dtype,
        vision=ckpt.vision,
        vision_bits=vision_bits,
    )
    out = _absolute(dst if dst is not None else default_output_name(source.name, the_recipe, dtype))
    check_destination(out, force, written_by_convert, "model directory")
    check_apart_from_source(out, source.directory)
    _check_disk(out, planned, source.directory)

    with assembling(out, "partial") as tmp, _rounded(ckpt, the_recipe, dtype, rounding) as rounded:
        with _progress(planned, quiet) as advance:
            rules = _write_weights(
                ckpt, planned, the_recipe, dtype, tmp, advance, drafter_layout, vision_bits, rounded
            )
        quantization = _write_metadata(ckpt, tmp, the_recipe, rules, drafter_layout)
        if chosen is not None:
            shortlist.write(tmp / MTP_DIR, chosen, ckpt.cfg.vocab_size)
        replace_dir(tmp, out)

    result = _result(out, ckpt, planned, quantization, t0)
    result.sensitivity, result.draft_vocab = sensitivity, chosen
    result.rounding = None if rounded is None else rounded.summary()
    if chosen is not None:
        result.bytes_by_part["mtp"] += shortlist_file.file_bytes(
            ckpt.cfg.vocab_size, len(chosen.ids)
        )
    if not quiet:
        log.info(format_summary(result, mtp_wanted=mtp, vision_wanted=vision))
    return result


def _result(
    out: Path,
    ckpt: SourceCheckpoint,
    planned: list[PlannedTensor],
    quantization: dict | None,
    t0: float,
) -> ConvertResult:
    """Measured once the model is in place, so that the time counts the whole run (checks,
    weights, metadata and the swap)."""
    by_part = bytes_by_part(planned)
    return ConvertResult(
        output=out,
        mtp_dir=out / MTP_DIR if ckpt.has_mtp else None,
        bytes_by_part=by_part,
        bits_per_weight=(by_part["embeddings"] + by_part["layers"]) * 8 / _weight_count(ckpt),
        seconds=time.perf_counter() - t0,
        peak_memory=_peak_rss(),
        tensors=len(planned),
        quantization=quantization,
    )


def default_output_name(source_name: str, recipe: Recipe | None, dtype: str) -> str:
    if recipe is None:
        return f"{source_name}-{dtype}"
    suffix = f"{recipe.bits}bit" if recipe.name == "uniform" else f"{recipe.name}-{recipe.bits}bit"
    return f"{source_name}-{suffix}"


# --- checks before writing -------------------------------------------------------------------


def _shortlist(ckpt: SourceCheckpoint, n: int | None) -> shortlist.Shortlist | None:
    """--draft-vocab N, checked and chosen before any weight is written."""
    if n is None:
        return None
    shortlist_file.check(n, ckpt.cfg.vocab_size, ckpt.has_mtp)
    return shortlist.shortlist(ckpt.directory, n, ckpt.cfg.vocab_size)


def _check_options(
    dtype: str,
    drafter_layout: str,
    quantize: bool,
    mtp: bool,
    vision: bool,
    force: bool,
    bits: int | None,
    group_size: int | None,
) -> None:
    """The options that need nothing read, checked before anything is (a --size download
    included)."""
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    if drafter_layout not in DRAFTER_LAYOUTS:
        raise ConfigError(
            f"drafter_layout must be one of {', '.join(DRAFTER_LAYOUTS)}, got {drafter_layout!r}"
        )
    for name, flag in (("quantize", quantize), ("mtp", mtp), ("vision", vision), ("force", force)):
        boolean(flag, name)
    if not quantize and (bits is not None or group_size is not None):
        raise ConfigError("--bits / --group-size have no effect with --no-quantize")


def _checked_recipe(
    recipe: str,
    bits: int | None,
    group_size: int | None,
    quantize: bool,
    vision: bool,
    vision_bits: int | None,
) -> Recipe | None:
    """The quantization recipe (None with --no-quantize), and --vision-bits checked against
    it: the vision tower is quantized only when it is kept and the rest is quantized too."""
    the_recipe = load_recipe(recipe, bits, group_size) if quantize else None
    if vision_bits is not None:
        if not vision:
            raise ConfigError("--vision-bits quantizes the vision tower; drop it or --no-vision")
        if not quantize:
            raise ConfigError("--vision-bits has no effect with --no-quantize")
        check_vision_bits(vision_bits)
    return the_recipe


def _check_auto(
    recipe: str,
    bits_per_weight: float | None,
    bits: int | None,
    group_size: int | None,
    quantize: bool,
) -> bool:
    """Whether the recipe is "auto", whose bits and group sizes are chosen per group within
    `bits_per_weight`; that budget means nothing to the other recipes."""
    from .quantize import AUTO

    if recipe != AUTO:
        if bits_per_weight is not None:
            raise ConfigError("--bits-per-weight is the budget of --recipe auto; add it")
        return False
    if not quantize:
        raise ConfigError("--recipe auto quantizes; drop --no-quantize")
    if bits is not None or group_size is not None:
        raise ConfigError(
            "--recipe auto chooses the bits and group size of each group: pass "
            "--bits-per-weight B instead of --bits / --group-size"
        )
    if bits_per_weight is not None and (
        isinstance(bits_per_weight, bool)
        or not isinstance(bits_per_weight, (int, float))
        or not math.isfinite(bits_per_weight)
    ):
        raise ConfigError(f"--bits-per-weight must be a number, got {bits_per_weight!r}")
    return True


def _auto_recipe(directory: Path, bits_per_weight: float | None, dtype: str) -> tuple[Recipe, str]:
    """The auto recipe for the budget, and a line saying what the measurement cost (it is
    cached per checkpoint: the second conversion of a checkpoint measures nothing)."""
    from .sensitivity import DEFAULT_BITS_PER_WEIGHT, auto_recipe, measure_sensitivity

    t0 = time.perf_counter()
    s = measure_sensitivity(directory, dtype=dtype)
    cached = time.perf_counter() - t0 < s.seconds
    budget = DEFAULT_BITS_PER_WEIGHT if bits_per_weight is None else bits_per_weight
    recipe = auto_recipe(s, budget)
    note = (
        f"recipe auto for {budget:g} bits per weight: sensitivity of {len(s.groups)} groups "
        f"on {s.tokens:,} calibration tokens, measured in {s.seconds:.1f} s"
        + (" (cached)" if cached else "")
        + f"; {recipe.description.split(', ', 1)[1]}"
    )
    return recipe, note


def _check_rounding(rounding: str, quantize: bool) -> None:
    from .rounding import check_rounding

    if check_rounding(rounding) != "nearest" and not quantize:
        raise ConfigError(f"--rounding {rounding} rounds quantized weights; drop --no-quantize")


@contextmanager
def _rounded(ckpt: SourceCheckpoint, recipe: Recipe | None, dtype: str, rounding: str):
    """The decoder layers' weights rounded by GPTQ, in a temporary folder for the pass to
    copy (None with "nearest": the pass rounds every chunk itself)."""
    if rounding == "nearest" or recipe is None:
        yield None
        return
    import tempfile

    from . import rounding as learned

    with tempfile.TemporaryDirectory(prefix="mlxkit-gptq-") as folder:
        yield learned.round_layers(ckpt, recipe, MX_DTYPES[dtype], Path(folder), learned.MAX_TOKENS)


def _source(src: str | Path | Source | Size, dst: str | Path | None, force: bool) -> Source:
    """The checkpoint to convert; a given `dst` is checked first, so that a destination that
    would be refused is refused before a --size download, not after it."""
    local = local_source(src)
    if dst is not None:
        if local is not None:
            check_apart_from_source(_absolute(dst), local.directory)
        check_destination(_absolute(dst), force, written_by_convert, "model directory")
    return local or resolve_source(src)


def _absolute(path: str | Path) -> Path:
    return local_path(path, "output", OutputError).absolute()


def written_by_convert(directory: Path) -> bool:
    """A model directory this converter wrote: its index carries the mark `_writers` puts
    there, and it holds only files a conversion writes (so no file of the user's is
    lost with it)."""
    index = directory / INDEX
    try:
        data = read_json(index, "safetensors index")
    except MlxkitError:
        return False
    mark = data.get("metadata", {}).get("created_by") if isinstance(data, dict) else None
    if not (isinstance(mark, str) and mark.startswith("mlxkit")):
        return False
    for entry in directory.iterdir():
        if entry.is_symlink():
            return False
        if entry.name == MTP_DIR and entry.is_dir():
            if not all(
                p.is_file() and not p.is_symlink() and _converter_file(p.name)
                for p in entry.iterdir()
            ):
                return False
        elif not (entry.is_file() and _converter_file(entry.name)):
            return False
    return True


def _converter_file(name: str) -> bool:
    written = (CONFIG, INDEX, *TOKENIZER_FILES, *PREPROCESSOR_FILES, shortlist_file.FILE)
    return name in written or bool(SHARD_NAME.fullmatch(name))


def _check_side_files(directory: Path) -> None:
    """The tokenizer, generation and preprocessor files that are there are read like the
    weights: regular files inside the model directory; those `mlxkit.load` reads are checked
    as it reads them and the chat template is compiled, so that what is converted also loads
    (the preprocessor configs were parsed by SourceCheckpoint.open). tokenizer.json itself is
    left to `tokenizers` at load: building Qwen's 248,077-token tokenizer here would add
    ~100 MB to the converter's peak memory."""
    from mlxkit.chat_template import ChatTemplate

    for name in (*TOKENIZER_FILES, *PREPROCESSOR_FILES):
        model_file(directory, name)
    files = read_tokenizer_files(directory)
    if files.chat_template is not None:
        ChatTemplate(files.chat_template)  # compiled: a syntax error is not shipped


def _check_disk(out: Path, planned: list[PlannedTensor], source_dir: Path) -> None:
    parent = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    need = (
        sum(t.nbytes for t in planned)
        + sum(
            (source_dir / f).stat().st_size for f in TOKENIZER_FILES if (source_dir / f).is_file()
        )
        * 2
        + DISK_MARGIN
    )
    free = shutil.disk_usage(parent).free
    if free < need:
        raise MlxkitError(
            f"not enough disk space at {parent}: the conversion needs about "
            f"{human_bytes(need)}, {human_bytes(free)} is free"
        )


# --- the streaming pass ----------------------------------------------------------------------


def _write_weights(
    ckpt: SourceCheckpoint,
    planned: list[PlannedTensor],
    recipe: Recipe | None,
    dtype: str,
    out: Path,
    advance,
    drafter_layout: str,
    vision_bits: int | None = None,
    rounded: Rounded | None = None,
) -> dict[str, tuple[int, int] | None]:
    """Streams every tensor through read → sanitize → quantize → write; returns the rule
    applied to each weight, by module path. In the "checkpoint" drafter layout the MTP
    head's tensors keep their checkpoint names and values (only cast and quantized). The
    vision tower's Conv3d weight is split by output channel, so its chunks transpose alone."""
    writers = _writers(ckpt, planned, out, drafter_layout, rounded is not None)
    rules, chunks = _chunks(ckpt, recipe, vision_bits, writers)
    _stream(ckpt, chunks, writers, dtype, drafter_layout == "checkpoint", advance, rounded)
    return rules


def _writers(
    ckpt: SourceCheckpoint,
    planned: list[PlannedTensor],
    out: Path,
    drafter_layout: str,
    gptq: bool = False,
) -> dict[str, ShardedWriter]:
    """The main model's writer, its index marked as ours for `written_by_convert` (and, for
    GPTQ weights, with their `rounding`: config.json's quantization block is the same as
    nearest rounding's, and `mlxkit.quality` must not take one's figures for the other's), and
    the drafter's in <out>/mtp/ when there is an MTP head."""
    main = [t for t in planned if t.part != "mtp"]
    drafter = [t for t in planned if t.part == "mtp"]
    mark = {"total_parameters": _weight_count(ckpt), "created_by": f"mlxkit {__version__}"}
    if gptq:
        mark["rounding"] = "gptq"
    writers = {"main": ShardedWriter(out, main, index_metadata=mark)}
    if drafter:
        (out / MTP_DIR).mkdir()
        writers["mtp"] = ShardedWriter(
            out / MTP_DIR,
            drafter,
            key=lambda p: _drafter_name(p, drafter_layout),
            metadata={"format": "pt"} if drafter_layout == "checkpoint" else None,
        )
    return writers


class _Chunk(NamedTuple):
    """Rows [start, stop) of one source tensor, and where they go."""

    path: str
    rule: tuple[int, int] | None
    writer: ShardedWriter
    last: bool  # the last chunk of its tensor
    info: TensorInfo
    start: int
    stop: int

    def read(self) -> mx.array:
        return read_raw_rows(self.info, self.start, self.stop)


def _chunks(
    ckpt: SourceCheckpoint,
    recipe: Recipe | None,
    vision_bits: int | None,
    writers: dict[str, ShardedWriter],
) -> tuple[dict[str, tuple[int, int] | None], list[_Chunk]]:
    """The rule of each weight, by module path, and every tensor cut into chunks of at most
    CHUNK_BYTES source bytes, so that memory does not grow with the largest tensor."""
    rules: dict[str, tuple[int, int] | None] = {}
    chunks: list[_Chunk] = []
    for path, shape in model_parameters(ckpt.cfg, include_mtp=ckpt.has_mtp, vision=ckpt.vision):
        info = ckpt.tensors[path]
        rule = weight_rule(path, shape, recipe, vision_bits)
        rules[path.removesuffix(".weight")] = rule
        writer = writers["mtp" if path.startswith("mtp.") else "main"]
        ranges = row_chunks(info, CHUNK_BYTES)
        chunks += [
            _Chunk(path, rule, writer, i == len(ranges) - 1, info, a, b)
            for i, (a, b) in enumerate(ranges)
        ]
    return rules, chunks


def _stream(
    ckpt: SourceCheckpoint,
    chunks: list[_Chunk],
    writers: dict[str, ShardedWriter],
    dtype: str,
    as_checkpoint: bool,
    advance,
    rounded: Rounded | None = None,
) -> None:
    """Three stages overlap: a reader thread copies the next chunks out of the memory map
    while this thread quantizes (MLX releases the GIL while it evaluates) and a writer
    thread `pwrite`s finished chunks. At most READ_AHEAD chunks wait on either side, so
    memory stays bounded."""
    old_cache = mx.set_cache_limit(4 * CHUNK_BYTES)
    reader = ThreadPoolExecutor(1, thread_name_prefix="mlxkit-read")
    writer_pool = ThreadPoolExecutor(1, thread_name_prefix="mlxkit-write")
    reads: deque = deque()
    writes: deque = deque()
    try:
        for chunk in chunks[:READ_AHEAD]:
            reads.append(reader.submit(chunk.read))
        for i, chunk in enumerate(chunks):
            rows = as_stored_dtype(chunk.info, reads.popleft().result())
            if i + READ_AHEAD < len(chunks):
                reads.append(reader.submit(chunks[i + READ_AHEAD].read))
            pieces = _convert_chunk(ckpt, chunk, rows, dtype, as_checkpoint, rounded)
            write = writer_pool.submit(_write_pieces, chunk.writer, chunk.start, pieces)
            writes.append((write, chunk.last))
            del rows, pieces
            _drain(writes, advance, READ_AHEAD)
        _drain(writes, advance, 0)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for pool in (reader, writer_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        reader.shutdown(wait=True)
        writer_pool.shutdown(wait=True)
        mx.set_cache_limit(old_cache)
        mx.clear_cache()


def _convert_chunk(
    ckpt: SourceCheckpoint,
    chunk: _Chunk,
    rows: mx.array,
    dtype: str,
    as_checkpoint: bool,
    rounded: Rounded | None = None,
) -> list[tuple[str, mx.array]]:
    """The chunk's pieces to write (the weight; its scales and biases when quantized: from
    `rounded`, a `rounding.Rounded`, when it rounded this weight at this rule), evaluated on
    this thread and checked for NaN and infinity before any is written."""
    out_dtype = MX_DTYPES[dtype]
    if as_checkpoint and chunk.path.startswith("mtp."):
        value = rows.astype(out_dtype)  # MTP tensors are all floating, none A_log
    else:
        _, value = checkpoint_tensor(
            chunk.info.name, rows, ckpt.cfg.tie_word_embeddings, out_dtype, ckpt.has_vision
        )
    if chunk.rule is None:
        pieces = [(chunk.path, value)]
    else:
        module = chunk.path.removesuffix(".weight")
        if rounded is not None and rounded.rules.get(module) == chunk.rule:
            w, scales, biases = rounded.rows(module, chunk.start, chunk.stop, out_dtype)
        else:
            w, scales, biases = quantize(value, *chunk.rule)
        pieces = [(chunk.path, w), (f"{module}.scales", scales), (f"{module}.biases", biases)]
    floats = [value, *(a for _, a in pieces[1:])]  # with a quantized weight's scales
    finite = mx.all(mx.stack([mx.isfinite(a).all() for a in floats]))
    mx.eval([a for _, a in pieces], finite)
    if not finite.item():
        _non_finite(chunk.info, rows, chunk.start, chunk.stop, dtype)
    return pieces


def _drain(writes: deque, advance, keep: int) -> None:
    """Waits for the oldest writes until at most `keep` are pending, and reports them."""
    while len(writes) > keep:
        future, done = writes.popleft()
        advance(future.result(), tensor_done=done)


def _drafter_name(path: str, drafter_layout: str) -> str:
    """A tensor's (or a module's) name in <dst>/mtp/: the checkpoint layout keeps `mtp.`."""
    return path if drafter_layout == "checkpoint" else drafter_key(path)


def _non_finite(info, rows: mx.array, start: int, stop: int, dtype: str) -> None:
    """Stops the run at the first chunk with a NaN or infinity: in the source (a corrupt
    checkpoint) or only once cast (a value beyond the range of --dtype)."""
    where = f"{info.file}: tensor {info.name} (rows {start}-{stop - 1})"
    if not mx.isfinite(rows).all().item():
        raise CheckpointError(f"{where} holds NaN or infinite values; the checkpoint is corrupt")
    raise ConfigError(
        f"{where} has values beyond the range of {dtype} (they would become infinite); "
        "convert with --dtype bfloat16 or float32"
    )


def _weight_count(ckpt: SourceCheckpoint) -> int:
    """Weights of the main model (embeddings + layers), counted before quantization."""
    return sum(math.prod(s) for _, s in model_parameters(ckpt.cfg, include_mtp=False))


def _write_pieces(writer: ShardedWriter, start: int, pieces: list[tuple[str, mx.array]]) -> int:
    return sum(writer.write(path, start, array) for path, array in pieces)


# --- config and tokenizer files --------------------------------------------------------------


def _write_metadata(
    ckpt: SourceCheckpoint,
    out: Path,
    recipe: Recipe | None,
    rules: dict[str, tuple[int, int] | None],
    drafter_layout: str,
) -> dict | None:
    """config.json as mlx-lm's converter writes it, plus the tokenizer and generation files,
    and the drafter's config and tokenizer files; returns the main `quantization` block."""
    quantization = drafter_quantization = None
    if recipe is not None:
        quantization = recipe.quantization_config(
            {m: r for m, r in rules.items() if not m.startswith("mtp.")}
        )
        drafter_quantization = recipe.quantization_config(
            {_drafter_name(m, drafter_layout): r for m, r in rules.items() if m.startswith("mtp.")}
        )
    config = dict(ckpt.config)
    generation = _read_json(ckpt.directory / "generation_config.json")
    if generation.get("eos_token_id"):
        config["eos_token_id"] = generation["eos_token_id"]  # mlx_lm.load_config does this
    config.pop("_name_or_path", None)
    if not ckpt.has_vision:
        config.pop("vision_config", None)  # the tower is left out: a text-only model
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    _write_json(out / "config.json", dict(sorted(config.items())))

    for name in TOKENIZER_FILES:
        if (ckpt.directory / name).is_file():
            shutil.copyfile(ckpt.directory / name, out / name)
    if ckpt.has_vision:
        _write_preprocessor_configs(ckpt, out)
    if not (out / "chat_template.jinja").exists():
        template = _read_json(ckpt.directory / "tokenizer_config.json").get("chat_template")
        if isinstance(template, str):  # transformers 5 / mlx-lm write it out as a file
            (out / "chat_template.jinja").write_text(template)
    if ckpt.has_mtp:
        _write_drafter_config(ckpt, out / MTP_DIR, drafter_quantization, drafter_layout)
        for name in DRAFTER_TOKENIZER_FILES:
            if (ckpt.directory / name).is_file():
                shutil.copyfile(ckpt.directory / name, out / MTP_DIR / name)
    return quantization


def preprocessor_configs(vision: VisionConfig) -> dict[str, dict]:
    """preprocessor_config.json and video_preprocessor_config.json as transformers writes them
    for Qwen 3.5, with the values mlxkit's `Preprocessor` takes when they are absent (so a
    model converted from a checkpoint without them preprocesses as the source did): the keys
    MLX Swift's Qwen3VLProcessorConfiguration requires, `processor_class` for its VLM loader,
    and the pixel bounds as `size` (transformers 5) and min/max_pixels (MLX Swift)."""
    from mlxkit.vision import Preprocessor

    pre = Preprocessor(vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
    shared = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(pre.image_mean),
        "image_std": list(pre.image_std),
        "merge_size": pre.merge_size,
        "patch_size": pre.patch_size,
        "temporal_patch_size": pre.temporal_patch_size,
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": pre.rescale_factor,
    }
    image = {
        **shared,
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"longest_edge": pre.max_pixels, "shortest_edge": pre.min_pixels},
        "min_pixels": pre.min_pixels,
        "max_pixels": pre.max_pixels,
    }
    video = {
        **shared,
        "video_processor_type": "Qwen3VLVideoProcessor",
        "fps": pre.video_fps,
        "min_frames": pre.video_min_frames,
        "max_frames": pre.video_max_frames,
        "do_sample_frames": True,
        "size": {"longest_edge": pre.video_max_pixels, "shortest_edge": pre.video_min_pixels},
    }
    return dict(zip(PREPROCESSOR_FILES, (image, video)))


def _write_preprocessor_configs(ckpt: SourceCheckpoint, out: Path) -> None:
    """The checkpoint's own files, copied; Qwen 3.5's defaults for any it lacks."""
    for name, default in preprocessor_configs(ckpt.vision).items():
        if (ckpt.directory / name).is_file():
            shutil.copyfile(ckpt.directory / name, out / name)
        else:
            _write_json(out / name, default)


def _write_drafter_config(
    ckpt: SourceCheckpoint, directory: Path, quantization: dict | None, drafter_layout: str
):
    """The drafter's config.json: the target's text config and the drafter's own
    quantization block, whose module paths are the drafter's tensor names less `.weight`.
    "mlx-vlm": what mlx-vlm's `qwen3_5_mtp` splitter writes (model type qwen3_5_mtp, a
    block size of depth + 2 tokens). "checkpoint": model type qwen3_5 with `text_config` and
    no `vision_config`, the configuration mlx-swift-lm's Qwen35TextMTPRegistration decodes
    as Qwen35Configuration for its text drafter, and a native checkpoint to mlx-vlm."""
    text = dict(ckpt.config.get("text_config") or ckpt.config)
    config: dict = {"text_config": text, "tie_word_embeddings": ckpt.cfg.tie_word_embeddings}
    if drafter_layout == "checkpoint":
        config["model_type"] = "qwen3_5"
    else:
        config["model_type"] = "qwen3_5_mtp"
        config["block_size"] = ckpt.cfg.mtp_num_hidden_layers + 2
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    _write_json(directory / "config.json", dict(sorted(config.items())))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


# --- progress and summary --------------------------------------------------------------------


@contextmanager
def _progress(planned: list[PlannedTensor], quiet: bool) -> Iterator:
    """A bytes-and-tensors bar on stderr when it is a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield lambda n, tensor_done=False: None
        return
    sources = sum(1 for t in planned if not t.path.endswith((".scales", ".biases")))
    done = [0]

    def label(_item=None) -> str:
        return f"{done[0]}/{sources} tensors"

    with click.progressbar(
        length=sum(t.nbytes for t in planned),
        label="converting",
        file=sys.stderr,
        item_show_func=label,
        show_pos=False,
        show_percent=True,
    ) as bar:

        def advance(n: int, tensor_done: bool = False) -> None:
            if tensor_done:
                done[0] += 1
            bar.update(n)

        yield advance


def format_summary(
    result: ConvertResult, mtp_wanted: bool = True, vision_wanted: bool = True
) -> str:
    parts = ", ".join(f"{part} {human_bytes(n)}" for part, n in result.bytes_by_part.items() if n)
    quant = result.quantization
    how = (
        "not quantized"
        if quant is None
        else (
            f"{quant['bits']}-bit affine, group {quant['group_size']}"
            + (
                " with per-layer overrides"
                if any(isinstance(v, dict) for v in quant.values())
                else ""
            )
        )
    )
    lines = [
        f"wrote {result.output} ({human_bytes(result.total_bytes)}: {parts})",
        f"{how}; {result.bits_per_weight:.2f} bits per weight; {result.tensors} tensors",
        f"{result.seconds:.1f} s, peak memory {human_bytes(result.peak_memory)}",
    ]
    if result.sensitivity is not None:
        lines.append(result.sensitivity)
    if result.rounding is not None:
        lines.append(result.rounding)
    if result.mtp_dir is not None:
        lines.append(f"MTP drafter in {result.mtp_dir}")
    elif mtp_wanted:
        lines.append("the checkpoint has no MTP head; no drafter written")
    if result.draft_vocab is not None:
        d = result.draft_vocab
        lines.append(
            f"draft vocabulary: {len(d.ids):,} tokens ({shortlist_file.FILE}), covering "
            f"{d.coverage:.1%} of the {d.tokens:,} calibration tokens"
        )
    if vision_wanted and not result.bytes_by_part["vision"]:
        lines.append("the checkpoint has no vision tower; a text-only model was written")
    return "\n".join(lines)


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
