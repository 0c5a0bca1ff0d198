"""Constrained decoding: the model may only write what a grammar allows (a JSON Schema, any
JSON, a regular expression or a Lark grammar), enforced by masking, at every step, the tokens
that cannot continue a valid output.

The grammar engine is llguidance (the optional extra `structured`): maintained (by the guidance
team; vLLM, SGLang, llama.cpp and mlx-vlm use it), it reads a Hugging Face tokenizer's own
tokenizer.json, compiles JSON Schema, regular expressions and Lark grammars, and hands out each
step's mask as a bitmask with no precomputation over the vocabulary (a median of 0.3 ms on
the 248,320-token vocabulary: benchmarks/results/structured.md). The mask of a step needs the
token before it, so a constrained step waits for that token's value (plain decoding's
pipelining of the next step is off) and MTP drafts wait for each mask in turn.

JSON output is compact and bounded in whitespace: `", "` between items, `": "` after keys and
no other whitespace (a schema's own "x-guidance" options may say otherwise), so an object
closes in as few tokens as its content needs. Once the grammar is complete, only the
end-of-turn tokens are allowed.

Thinking: when the prompt leaves a `<think>` block open (Qwen 3.5 with thinking on), the
reasoning is free and the constraint applies from the token after `</think>`; with thinking
off (or a prompt with no open block) it applies from the first generated token.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxkit.checkpoint import read_json
from mlxkit.errors import MlxkitError
from mlxkit.fields import local_path

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# compact JSON, as json.dumps writes it: the only whitespace the grammar allows
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MISSING = "constrained decoding needs llguidance: pip install 'mlxkit[structured]'"


class GrammarError(MlxkitError):
    """A grammar, schema or response_format that cannot be used."""


@dataclass(frozen=True)
class Grammar:
    """What the output must match: `kind` is "json_schema" (source: the schema as JSON text),
    "json" (any JSON value), "regex" or "lark"."""

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema: Mapping | str) -> Grammar:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON Schema is not valid JSON: {e}") from None
        if not isinstance(schema, Mapping):
            raise GrammarError("a JSON Schema must be a JSON object")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json(cls) -> Grammar:
        return cls("json")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", _text("a regular expression", pattern))

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        return cls("lark", _text("a Lark grammar", grammar))

    def compiled(self) -> str:
        """The grammar as llguidance takes it."""
        LLMatcher = _llguidance().LLMatcher
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.source)
        schema = json.loads(self.source) if self.kind == "json_schema" else {}
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"{NAMES[self.kind]} cannot be used: {_first_line(e)}") from None


def _text(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise GrammarError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _first_line(error: object) -> str:
    """An llguidance error in one line: its first, and the line that says what is wrong when
    that comes later (regex errors point at the place first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    detail = next((line for line in lines[1:] if line.startswith("error:")), "")
    return f"{lines[0].removesuffix(':')} ({detail})" if detail else lines[0]


NAMES = {
    "json_schema": "the JSON Schema",
    "json": "the JSON grammar",
    "regex": "the regular expression",
    "lark": "the Lark grammar",
}


def schema_file(path: object) -> dict:
    """A JSON Schema file (`mlxkit generate --json-schema FILE`) as a response_format."""
    schema = read_json(local_path(path, "--json-schema", GrammarError), "JSON Schema", GrammarError)
    if not isinstance(schema, dict):  # a JSON string would be parsed again as a schema's text
        raise GrammarError("a JSON Schema must be a JSON object")
    return {"type": "json_schema", "json_schema": {"schema": schema}}


def grammar_of(response_format: Mapping | None, grammar: Grammar | str | None) -> Grammar | None:
    """The grammar of stream_generate's `response_format` (OpenAI's shape: {"type": "text"},
    {"type": "json_object"}, or {"type": "json_schema", "json_schema": {"schema": ...}}) or
    `grammar` (a Grammar, or a string: a Lark grammar); None for free text."""
    if grammar is not None and response_format is not None:
        raise GrammarError("pass either response_format or grammar, not both")
    if grammar is not None:
        if isinstance(grammar, str):
            return Grammar.lark(grammar)
        if not isinstance(grammar, Grammar):
            raise GrammarError("grammar must be a Grammar or a Lark grammar (a string)")
        return grammar
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise GrammarError('response_format must be a mapping such as {"type": "json_object"}')
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_schema({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise GrammarError('response_format "json_schema" needs {"json_schema": {"schema": …}}')
        return Grammar.json_schema(spec["schema"])
    raise GrammarError(
        f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}'
    )


def _llguidance():
    """The llguidance module, or one line saying how to install it."""
    try:
        import llguidance
    except ImportError:
        raise MlxkitError(MISSING) from None
    return llguidance


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer, vocab: int):
    """llguidance's view of a tokenizer (built once per tokenizer and vocabulary size: the
    model's embedding rows past the tokenizer's entries are never allowed)."""
    built = _TOKENIZERS.setdefault(tokenizer, {})
    if vocab not in built:
        built[vocab] = _llguidance().LLTokenizer(
            tokenizer._tokenizer.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_ids
        )
    return built[vocab]


class Constraint:
    """One generation's grammar state: the mask for the next token given the tokens generated
    so far. `push` adds a token and `rollback` takes tokens back (MTP drafts are pushed while
    drafting and taken back before verification); `sync` catches up with the tokens committed.
    Until a `</think>` closes the prompt's open thinking block, nothing is masked."""

    def __init__(self, tokenizer, grammar: Grammar, vocab: int) -> None:
        ll = _ll_tokenizer(tokenizer, vocab)
        self._matcher = _llguidance().LLMatcher(ll, grammar.compiled(), log_level=0)
        if self._matcher.is_error():
            error = _first_line(self._matcher.get_error())
            raise GrammarError(f"{NAMES[grammar.kind]} cannot be used: {error}")
        self.vocab = vocab
        self._think_open = tokenizer.token_to_id(THINK_OPEN)
        self._think_close = tokenizer.token_to_id(THINK_CLOSE)
        self._eos = np.zeros(vocab, dtype=bool)
        self._eos[tokenizer.eos_token_ids] = True
        self._tokens: list[int] = []  # generated tokens pushed, committed or drafted
        self._active_from: int | None = None  # index in _tokens where the grammar starts
        self._seen: int | None = None  # how much of the committed history `sync` has read

    def sync(self, history: Sequence[int]) -> None:
        """Catches up with the committed tokens: `history` is the prompt and everything
        generated since (the first call's is the prompt alone)."""
        if self._seen is None:
            self._seen = len(history)
            opened = _last(history, self._think_open) > _last(history, self._think_close)
            self._active_from = None if opened and self._think_close is not None else 0
            return
        for token in history[self._seen :]:
            self.push(token)
        self._seen = len(history)

    def push(self, token: int) -> None:
        if self._active_from is not None:
            if not self._matcher.consume_token(token):
                raise MlxkitError(
                    f"token {token} broke the grammar: {_first_line(self._matcher.get_error())}"
                )
        elif token == self._think_close:
            self._active_from = len(self._tokens) + 1
        self._tokens.append(token)

    def rollback(self, n: int) -> None:
        """Takes back the last n tokens pushed."""
        if n <= 0:
            return
        keep = len(self._tokens) - n
        if self._active_from is not None:
            self._matcher.rollback(len(self._tokens) - max(keep, self._active_from))
            if self._active_from > keep:
                self._active_from = None
        del self._tokens[keep:]

    def mask(self) -> mx.array | None:
        """The tokens allowed next [V] (bool), None while the grammar does not apply yet."""
        if self._active_from is None:
            return None
        if self._matcher.is_stopped():
            allowed = self._eos
        else:
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool)
        return mx.array(allowed)


def _last(tokens: Sequence[int], token: int | None) -> int:
    """The index of the last occurrence of `token`, -1 if none."""
    if token is None:
        return -1
    return next((i for i in range(len(tokens) - 1, -1, -1) if tokens[i] == token), -1)


def apply_mask(logits: mx.array, mask: mx.array | None) -> mx.array:
    """Logits [..., V] with the disallowed tokens at -inf (mask [..., V] bool, or None)."""
    if mask is None:
        return logits
    return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))
