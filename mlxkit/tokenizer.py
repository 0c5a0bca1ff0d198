"""The runtime tokenizer that `mlxkit.load()` returns: text ↔ ids for a model directory in the
Hugging Face layout (tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json — the files transformers, mlx-lm and MLX Swift read too), its chat
template, stop tokens and a streaming detokenizer. Writing those files is build-time work:
`mlxkit.tokenizer_build`.
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import decoders

from mlxkit.errors import CheckpointError

if TYPE_CHECKING:
    from mlxkit.chat_template import ChatTemplate

__all__ = ["StreamingDetokenizer", "Tokenizer", "load_tokenizer"]


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
        self._template: ChatTemplate | None = None  # compiled on first use

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
            from mlxkit.chat_template import ChatTemplate

            # templates come with downloaded checkpoints: rendered sandboxed and bounded
            self._template = ChatTemplate(self._chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tools=tools,
            **template_kwargs,
        )


def _eos_ids(
    tokenizer: tokenizers.Tokenizer, generation: list[int] | None, eos_token: str | None
) -> list[int]:
    """generation_config.json's eos_token_id (what generation stops on), else the tokenizer's
    eos token."""
    if generation is not None:
        return generation
    token_id = tokenizer.token_to_id(eos_token) if eos_token else None
    return [] if token_id is None else [token_id]


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (tokenizer.json, plus the optional
    tokenizer_config.json, chat_template.jinja and generation_config.json), its files read
    as untrusted input (`mlxkit.checkpoint.read_tokenizer_files`)."""
    from mlxkit.checkpoint import read_tokenizer_files

    model_dir = Path(model_dir)
    files = read_tokenizer_files(model_dir)
    path = files.tokenizer
    if path is None:
        raise CheckpointError(f"{model_dir}: tokenizer.json is missing")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: cannot read it ({str(e).splitlines()[0]})") from e
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        raise CheckpointError(f"{path}: not a byte-level BPE tokenizer, as Qwen 3.5's is")
    eos = _eos_ids(tokenizer, files.eos_token_ids, files.eos_token)
    return Tokenizer(tokenizer, eos, files.chat_template)
