"""Reading a model directory's files without trusting them: config.json, the list of
safetensors shards, and each shard's header checked against the safetensors format and
the file's real size, so a bad download — or a hostile file — fails with a message naming
the file and tensor instead of deep inside MLX, a hang, or a read from the wrong bytes.

Rules, all checked before a weight byte is read:
- JSON files are regular files of bounded size, UTF-8, without NaN; nesting deeper than
  Python's recursion limit is an error, not a crash.
- The tokenizer, generation and chat-template files are read the same way (the fields
  mlxkit reads from them typed), by `mlxkit.load` and, before converting, by the converter.
- Shards are plain `*.safetensors` file names inside the model directory (no `..`, no
  absolute paths, no symlinks that leave it — except into the Hugging Face cache's blob
  store, where every snapshot file points), and regular files (a FIFO would block a read).
- A header is a JSON object of tensors with a known dtype, non-negative integer shapes, and
  offsets that tile the data area exactly: in order, without gaps or overlaps, each
  `product(shape) × itemsize` long, the last ending at the end of the file (the rules of
  the safetensors reference implementation).
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mlxkit.errors import CheckpointError, MlxkitError
from mlxkit.fields import integer, mapping, shown, string

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's limit
MAX_JSON_BYTES = 64 << 20  # a 9B index is ~100 KB, a config a few KB
MAX_DIM = 2**31 - 1  # MLX shapes are int32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F32, U32, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def short(name: str, limit: int = 80) -> str:
    """A name from a file, quoted and cut to one short line for an error message."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def plain(name: str, limit: int = 80) -> str:
    """A name from a file as it is when it is short and printable, else quoted by `short`."""
    return name if len(name) <= limit and name.isprintable() else short(name, limit)


def regular_file_size(
    path: Path, what: str = "file", error: type[MlxkitError] = CheckpointError
) -> int:
    """The size of `path`, which must be (or link to) a regular file: a directory, FIFO or
    device in its place is an error, never opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (OSError, ValueError) as e:  # a symlink loop, a name too long, a NUL byte
        raise error(f"{path}: cannot read this {what} ({_reason(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise error(f"{path}: {kind}; expected a {what}")
    return st.st_size


def read_text(
    path: Path, what: str, error: type[MlxkitError] = CheckpointError, limit: int = MAX_JSON_BYTES
) -> str:
    """A regular file of at most `limit` bytes of UTF-8 text."""
    size = regular_file_size(path, what, error)
    if size > limit:
        raise error(f"{path}: {size:,} bytes is too large for a {what}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; expected a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({_reason(e)})") from None


def read_json(
    path: Path,
    what: str = "JSON file",
    error: type[MlxkitError] = CheckpointError,
    limit: int = MAX_JSON_BYTES,
) -> object:
    """A JSON file, refusing what would hang, exhaust memory or crash the parser."""
    text = read_text(path, what, error, limit)
    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply; expected a {what}") from None
    except ValueError as e:  # JSONDecodeError, NaN, or an integer of thousands of digits
        raise error(f"{path}: not valid JSON ({_reason(e)})") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0][:200]


def read_config(model_dir: Path) -> dict:
    path = model_file(model_dir, "config.json", "config.json")
    if path is None:
        raise CheckpointError(f"{model_dir}: no config.json here; is this a model directory?")
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object; expected a model config")
    return config


# --- tokenizer and generation files -----------------------------------------------------------

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# config.json's vision token ids and the tokens they name (the chat template writes these);
# and the tokens that end a text or frame a chat turn, which no vision token may share.
VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MAX_TEMPLATE_BYTES = 1 << 20  # Qwen's chat template is ~7 KB


@dataclass(frozen=True)
class TokenizerFiles:
    """What a model directory holds for its tokenizer, read by the rules above: regular files
    inside the directory; the JSON ones objects whose fields mlxkit reads have the right
    types. The converter checks a source with it, so what it converts also loads."""

    tokenizer: Path | None  # tokenizer.json (parsed by the `tokenizers` library)
    config: dict  # tokenizer_config.json, {} when absent
    generation: dict  # generation_config.json, {} when absent
    chat_template: str | None  # chat_template.jinja, else tokenizer_config's default one

    @property
    def eos_token_ids(self) -> list[int] | None:
        """generation_config.json's eos_token_id (checked), None when it has none."""
        ids = self.generation.get("eos_token_id")
        return None if ids is None else [ids] if isinstance(ids, int) else list(ids)

    @property
    def eos_token(self) -> str | None:
        """tokenizer_config.json's eos_token (a string, or an AddedToken's content)."""
        eos = self.config.get("eos_token")
        return eos.get("content") if isinstance(eos, dict) else eos


def read_json_object(model_dir: Path, name: str) -> dict | None:
    """`model_dir / name` as a JSON object, None when there is no such file."""
    path = model_file(model_dir, name, name)
    if path is None:
        return None
    data = read_json(path, name)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object; expected a {name}")
    return data


def read_tokenizer_files(model_dir: Path) -> TokenizerFiles:
    config = read_json_object(model_dir, "tokenizer_config.json") or {}
    generation = read_json_object(model_dir, "generation_config.json") or {}
    where = model_dir / "generation_config.json"
    ids = generation.get("eos_token_id")
    for token in ids if isinstance(ids, list) else [] if ids is None else [ids]:
        integer(token, f"{where}: eos_token_id", 0, MAX_DIM, CheckpointError)
    where = model_dir / "tokenizer_config.json"
    eos = config.get("eos_token")
    content = eos.get("content") if isinstance(eos, dict) else eos
    if content is not None and not isinstance(content, str):
        raise CheckpointError(f"{where}: eos_token must be a token string, got {shown(eos)}")
    path = model_file(model_dir, CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_FILE)
    if path is not None:
        template = read_text(path, "chat template", limit=MAX_TEMPLATE_BYTES)
    else:
        template = _inline_template(config.get("chat_template"), where)
    return TokenizerFiles(
        model_file(model_dir, "tokenizer.json", "tokenizer.json"), config, generation, template
    )


def check_vision_token_ids(model_dir: Path, config: dict) -> None:
    """config.json's four vision token ids (typed, in the vocabulary and distinct: checked by
    `ModelConfig`) against the tokenizer's: each is the id tokenizer.json gives its own token
    (the chat template writes the token as text, the runtime finds the pads by id), and none is
    the id of an end-of-text, chat or padding token. A vision_start id equal to the eos id
    would end every answer at its first image; an image id equal to im_end would turn the end
    of each turn into an image pad."""
    tokenizer = read_json_object(model_dir, "tokenizer.json") or {}
    added = tokenizer.get("added_tokens")
    ids = {
        t["content"]: t["id"]
        for t in (added if isinstance(added, list) else [])
        if isinstance(t, dict) and isinstance(t.get("content"), str) and _is_int(t.get("id"))
    }
    generation = read_tokenizer_files(model_dir).generation
    reserved = {ids[t]: t for t in CHAT_SPECIAL_TOKENS if t in ids}
    eos = generation.get("eos_token_id")
    for name, value in [
        *(("eos_token_id", e) for e in (eos if isinstance(eos, list) else [eos])),
        ("pad_token_id", generation.get("pad_token_id")),
    ]:
        if _is_int(value):
            reserved.setdefault(value, f"generation_config.json's {name}")
    where = model_dir / "config.json"
    for key, token in VISION_TOKENS.items():
        value = config.get(key)
        if _is_int(value) and value in reserved:
            raise CheckpointError(
                f"{where}: {key} {value} is the id of {reserved[value]}; the vision tokens need "
                "ids of their own"
            )
        if token in ids and value != ids[token]:
            raise CheckpointError(
                f"{where}: {key} {shown(value)} is not {token}'s id {ids[token]} in tokenizer.json"
            )


def _inline_template(value: object, where: Path) -> str | None:
    """tokenizer_config.json's chat_template (older layout): a string, or named templates of
    which the one named "default" is used."""
    if value is None or isinstance(value, str):
        return value
    named = value if isinstance(value, list) else []
    if not named or not all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in named
    ):
        raise CheckpointError(
            f"{where}: chat_template must be a string or a list of {{name, template}} strings, "
            f"got {shown(value)}"
        )
    return next((t["template"] for t in named if t["name"] == "default"), None)


def quantization_block(config: dict, where: str) -> dict:
    """config.json's `quantization` (mlx-lm's layout: defaults plus per-module overrides,
    a module set to false stays unquantized), checked; {} when there is none."""
    q = config.get("quantization")
    if q is None:
        return {}
    q = mapping(q, f"{where}: quantization", CheckpointError)

    def settings(block: dict, at: str) -> None:
        for key in ("bits", "group_size"):
            if key in block:
                integer(block[key], f"{at}.{key}", 1, 1024, CheckpointError)
        if "mode" in block:
            string(block["mode"], f"{at}.mode", error=CheckpointError)

    settings(q, f"{where}: quantization")
    for module, value in q.items():
        at = f"{where}: quantization[{short(module)}]"
        if isinstance(value, dict):
            settings(value, at)
        elif module not in ("bits", "group_size", "mode") and not isinstance(value, bool):
            raise CheckpointError(f"{at}: expected settings (an object) or true/false")
    return q


# --- shards ------------------------------------------------------------------------------------


def _allowed_roots(model_dir: Path) -> list[str]:
    """Where a shard may really live: the model directory, and for a Hugging Face cache
    snapshot (…/models--Org--Name/snapshots/<rev>/) the repo's blob store beside it."""
    real = Path(os.path.realpath(model_dir))
    roots = [str(real)]
    for snapshot in (real, *real.parents):  # a converted model's mtp/ is a folder of one
        if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith(
            "models--"
        ):
            roots.append(str(snapshot.parent.parent / "blobs"))
            break
    return roots


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def model_file(model_dir: Path, name: str, what: str = "file") -> Path | None:
    """`model_dir / name`, or None when there is none: a regular file (never a FIFO or a
    directory) that really lies in the model directory — a symlink may point only into the
    Hugging Face blob store of a cache snapshot."""
    path = model_dir / name
    if path.is_symlink():
        _check_link(model_dir, path)
    elif not path.exists():
        return None
    regular_file_size(path, what)
    return path


def model_subdir(model_dir: Path, name: str) -> Path | None:
    """`model_dir / name` when it is a directory that really lies in the model directory
    (a converted model's mtp/), else None."""
    path = model_dir / name
    if path.is_symlink():
        _check_link(model_dir, path)
    return path if path.is_dir() else None


def _check_link(model_dir: Path, path: Path) -> None:
    try:
        real = os.path.realpath(path, strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: a broken symlink or symlink loop ({_reason(e)})") from None
    if not any(_inside(real, root) for root in _allowed_roots(model_dir)):
        raise CheckpointError(
            f"{path}: a symlink to {real}, outside the model directory; copy it in"
        )


def shard_path(model_dir: Path, name: object, where: str) -> Path:
    """`model_dir / name` after checking that `name` is a plain `*.safetensors` file name
    whose file really lies in the model directory and is a regular file."""
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: shard names must be strings, got {type(name).__name__}")
    if (
        not name.endswith(".safetensors")
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise CheckpointError(
            f"{where}: {short(name)} is not a plain *.safetensors file name in the model directory"
        )
    path = model_file(model_dir, name, "safetensors file")
    if path is None:
        raise CheckpointError(f"{where}: names {name}, which is missing")
    return path


def weight_files(model_dir: Path) -> list[Path]:
    """Shards named by model.safetensors.index.json if present, else every *.safetensors."""
    index = model_file(model_dir, INDEX, "safetensors index")
    if index is not None:
        data = read_json(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map object)")
        names = set()
        for tensor, name in weight_map.items():
            if not isinstance(name, str):
                raise CheckpointError(
                    f"{index}: weight_map[{short(tensor)}] is {type(name).__name__}, not a "
                    "file name"
                )
            names.add(name)
        if not names:
            raise CheckpointError(f"{index}: weight_map is empty")
        return [shard_path(model_dir, name, str(index)) for name in sorted(names)]
    try:
        found = sorted(model_dir.glob("*.safetensors"))
    except OSError as e:
        raise CheckpointError(f"{model_dir}: cannot list ({_reason(e)})") from None
    if not found:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files")
    return [shard_path(model_dir, p.name, str(model_dir)) for p in found]


# --- headers -----------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"the name {short(key)} appears twice")
        out[key] = value
    return out


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and validates one safetensors header (see the module docstring)."""
    size = regular_file_size(path, "safetensors file")
    n, raw = _header_bytes(path, size)
    header = _parse_header(path, raw)
    base, data_bytes = 8 + n, size - 8 - n
    entries = [_tensor_entry(path, name, meta, data_bytes) for name, meta in header.items()]
    _check_tiling(path, entries, data_bytes)
    return {
        name: TensorInfo(name, dtype, shape, base + start, base + end, path)
        for start, end, name, dtype, shape in entries
    }


def _header_bytes(path: Path, size: int) -> tuple[int, bytes]:
    """The header's declared length and its bytes, read only once the length is known to fit
    the file and the limit: a corrupt length is not an allocation of up to 2⁶⁴ bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the file; truncated download?"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header of {n:,} bytes is larger than allowed")
            return n, f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({_reason(e)})") from None


def _parse_header(path: Path, raw: bytes) -> dict:
    """The header's tensor entries, `__metadata__` checked and taken out. A duplicate key, a
    NaN or a nesting deep enough to overflow the parser is refused, not read as some value."""
    bad = f"{path}: not a safetensors file:"
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{bad} the header is not a JSON object")
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constants
        )
    except RecursionError:
        raise CheckpointError(f"{bad} the header is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{bad} the header is not valid JSON ({_reason(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{bad} __metadata__ must map strings to strings")
    return header


def _tensor_entry(
    path: Path, name: str, meta: object, data_bytes: int
) -> tuple[int, int, str, str, tuple[int, ...]]:
    """(start, end, name, dtype, shape) of one header entry, its byte count checked against
    its shape and dtype so that a tensor is never read past its own bytes."""
    where = f"{path}: tensor {short(name)}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{where}: unknown dtype {short(str(dtype), 30)}")
    if not isinstance(shape, list) or not all(_is_int(d, MAX_DIM) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be two non-negative integers")
    start, end = offsets
    if start > end or end > data_bytes:
        raise CheckpointError(
            f"{where}: data_offsets [{start}, {end}] lie outside the {data_bytes} data "
            "bytes of the file (truncated download?)"
        )
    if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CheckpointError(
            f"{where}: {end - start} bytes for a {dtype} tensor of shape {tuple(shape)}"
        )
    return start, end, name, dtype, tuple(shape)


def _check_tiling(
    path: Path, entries: list[tuple[int, int, str, str, tuple[int, ...]]], data_bytes: int
) -> None:
    """The tensors must cover the data bytes exactly, without gaps or overlaps: two tensors
    sharing bytes, or bytes no tensor owns, mean the file is not what its header says."""
    expected = 0
    for start, end, name, _, _ in sorted(entries):
        if start != expected:
            how = "overlaps the tensor before it" if start < expected else "leaves a gap"
            raise CheckpointError(f"{path}: tensor {short(name)} {how} (at byte {start})")
        expected = end
    if expected != data_bytes:
        raise CheckpointError(
            f"{path}: the tensors end at byte {expected} of {data_bytes} data bytes "
            "(trailing bytes: not a safetensors file)"
        )


def _is_int(value: object, hi: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= 0
        and (hi is None or value <= hi)
    )


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint; a name in two shards is an error."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {short(name)} appears in both {tensors[name].file} and {f}"
                )
            tensors[name] = info
    return tensors
