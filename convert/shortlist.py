"""The draft vocabulary `mlxkit convert --draft-vocab N` writes beside the drafter
(`mlxkit.draft_vocab` says what it is for and how the runtime uses it).

Which N tokens: the calibration set (convert/calibration/, the one `--recipe auto` measures
on; never the evaluation set) tokenized with the model's own tokenizer, conversations rendered
by its chat template, and its tokens ranked by count. The set is a few thousand tokens, so
past the tokens it holds the ranking falls back on the token id: a byte-level BPE numbers its
tokens in merge order, most frequent in the tokenizer's training text first. Ties go to the
lower id too. What share of held-out text a given N covers with Qwen 3.5's tokenizer is
measured in benchmarks/draft_vocab.py (results in benchmarks/results/draft_vocab.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxkit import draft_vocab
from mlxkit.errors import CheckpointError


@dataclass(frozen=True)
class Shortlist:
    ids: np.ndarray  # [N] token ids, ranked (most frequent first)
    calibration: str  # digest of the token stream counted
    tokens: int  # calibration tokens counted
    covered: int  # of them, how many the shortlist holds

    @property
    def coverage(self) -> float:
        return self.covered / self.tokens


def calibration_ids(model_dir: Path) -> np.ndarray:
    """The calibration set as token ids of the tokenizer in `model_dir`."""
    from mlxkit.convert.sensitivity import calibration_texts

    from mlxkit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = [t for text in calibration_texts(tokenizer) for t in tokenizer.encode(text)]
    return np.array(ids, dtype=np.int64)


def rank(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Every token id of the vocabulary, most frequent in `ids` first, then by id."""
    counts = np.bincount(ids, minlength=vocab_size)
    return np.lexsort((np.arange(vocab_size), -counts))


def shortlist(model_dir: Path, n: int, vocab_size: int) -> Shortlist:
    """The N tokens the drafter of the model in `model_dir` (its tokenizer) drafts over."""
    ids = calibration_ids(model_dir)
    if len(ids) == 0 or ids.max() >= vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer's ids do not fit the model's {vocab_size:,}-token "
            "vocabulary; check tokenizer.json against config.json"
        )
    chosen = rank(ids, vocab_size)[:n]
    digest = hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest()[: draft_vocab.DIGEST_CHARS]
    covered = int(np.isin(ids, chosen).sum())
    return Shortlist(chosen, digest, len(ids), covered)


def write(directory: Path, chosen: Shortlist, vocab_size: int) -> int:
    """Writes `draft_vocab.json` into the drafter `directory`; returns its size in bytes."""
    data = draft_vocab.encode(chosen.ids.tolist(), vocab_size, chosen.calibration)
    (directory / draft_vocab.FILE).write_bytes(data)
    return len(data)
