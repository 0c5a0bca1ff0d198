"""benchmarks/quality.py --set: one set of the built-in evaluation set, passed as one text,
must be scored on the very tokens (hence windows) the whole set cuts from that set."""

from __future__ import annotations

import pytest

from benchmarks.quality import MICRO_DIR, set_text
from mlxkit.quality import BUILTIN_SETS, _builtin_texts
from mlxkit.tokenizer import load_tokenizer


@pytest.mark.parametrize("name", tuple(BUILTIN_SETS))
def test_a_set_alone_is_the_tokens_the_whole_set_holds_for_it(name: str) -> None:
    tokenizer = load_tokenizer(MICRO_DIR)
    stream = [t for text in _builtin_texts(tokenizer)[name] for t in tokenizer.encode(text)]
    assert tokenizer.encode(set_text(name)) == stream


def test_the_code_set_has_its_documented_tokens() -> None:
    """3,238 tokens with micro's tokenizer: 13 windows of 256, 3,225 scored positions (the
    figure benchmarks/results/quality.md's code-set section reports)."""
    assert len(load_tokenizer(MICRO_DIR).encode(set_text("code"))) == 3238
