"""The shortlist draft head (`mlxkit convert --draft-vocab N`): what share of text a shortlist
of N tokens covers with the real Qwen 3.5 tokenizer, and what a draft step costs over it
against the whole 248,320-token head.

    python benchmarks/make_checkpoint.py --size 0.8b --layers 1 --no-vision /tmp/q08
    python -m mlxkit convert --hf-path /tmp/q08 -o /tmp/q08-4bit --draft-vocab 32768
    python -m mlxkit convert --hf-path /tmp/q08 -o /tmp/q08-bf16 --no-quantize
    python benchmarks/draft_vocab.py /tmp/q08-4bit /tmp/q08-bf16 --out benchmarks/results/draft_vocab.md

Coverage: the shortlist is ranked as the converter ranks it (convert/shortlist.py: counts on
the calibration set, then token id). It is reported on the calibration set itself (the text it
was ranked on) and on held-out text from this Python's standard library (none of it in the
calibration or the evaluation set): IDLE's NEWS.txt (prose) and textwrap.py and
email/message.py (code). The share of held-out tokens in the shortlist bounds what greedy
drafting can still match: a draft is never outside it. "id order" ranks by token id alone
(no calibration), to show what the calibration set adds. Not measured: the share of a real
model's drafts (there are no real weights here).

Draft step: one MTP step as decode.py runs it (the MTP layer on one position, the draft
logits, argmax), on each model, with the whole head and with shortlists of N tokens (the head's
rows copied as `Model.use_draft_vocab` does); the number of main-model layers does not enter a
draft step. Interleaved repeats, median and min-max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from machine import machine
from mlxkit.convert.shortlist import calibration_ids, rank

from mlxkit.load import load_model
from mlxkit.tokenizer import load_tokenizer
from mlxkit.tokenizer_build import build_qwen_tokenizer

SIZES = (4096, 8192, 16384, 32768, 65536)
HELD_OUT = ("idlelib/NEWS.txt", "textwrap.py", "email/message.py")


def coverage_rows(sizes: tuple[int, ...]) -> tuple[list[str], int, int]:
    """Markdown rows of coverage per N, and the calibration and held-out token counts."""
    with tempfile.TemporaryDirectory() as tmp:
        build_qwen_tokenizer(tmp)
        tokenizer = load_tokenizer(tmp)
        calibration = calibration_ids(Path(tmp))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = np.array(
        [t for name in HELD_OUT for t in tokenizer.encode((stdlib / name).read_text())],
        dtype=np.int64,
    )
    vocab = tokenizer.vocab_size
    ranked, by_id = rank(calibration, vocab), np.arange(vocab)
    rows = []
    for n in sizes:
        short = ranked[:n]
        rows.append(
            f"| {n:,} | {np.isin(calibration, short).mean():.1%} | {np.isin(held, short).mean():.1%} "
            f"| {np.isin(held, by_id[:n]).mean():.1%} |"
        )
    return rows, len(calibration), len(held)


def draft_step_ms(model, ids: np.ndarray | None, repeats: int) -> list[float]:
    """Milliseconds of one draft step (MTP layer, draft logits, argmax), `repeats` times."""
    model.use_draft_vocab(None if ids is None else mx.array(np.sort(ids), dtype=mx.int32))
    H = model.config.hidden_size
    h = mx.random.normal((1, 1, H), key=mx.random.key(0)).astype(mx.bfloat16)
    token = mx.array([[11]])
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        hidden = model.mtp_hidden(h, token, model.make_mtp_cache())
        mx.eval(model.draft_logits(hidden).argmax(-1))
        if i:  # the first run builds the shortlist's rows
            times.append((time.perf_counter() - t0) * 1000)
    return times


def step_rows(path: Path, sizes: tuple[int, ...], repeats: int) -> list[str]:
    model = load_model(path, drafter=path / "mtp")
    model.use_draft_vocab(None)
    ranked = rank(calibration_ids(path), model.config.vocab_size)
    modes = [None, *sizes]
    times: dict[int | None, list[float]] = {m: [] for m in modes}
    for m in modes:
        draft_step_ms(model, None if m is None else ranked[:m], 1)  # warm up
    for _ in range(repeats):  # interleaved: a busy moment hits every mode alike
        for m in modes:
            times[m] += draft_step_ms(model, None if m is None else ranked[:m], 1)
    full = statistics.median(times[None])
    rows = []
    for m in modes:
        t = times[m]
        label = "whole head (248,320)" if m is None else f"{m:,}"
        rows.append(
            f"| {path.name} | {label} | {statistics.median(t):.2f} | {min(t):.2f}–{max(t):.2f} "
            f"| {full / statistics.median(t):.2f}× |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", type=Path, help="converted 0.8B-shaped models")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    command = "python benchmarks/draft_vocab.py " + " ".join(sys.argv[1:])
    rows, n_cal, n_held = coverage_rows(SIZES)
    lines = [
        "# The shortlist draft head: coverage and draft-step time",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        f"`{command}` (what it measures: the script's docstring).",
        "",
        (
            f"## Coverage (the real Qwen 3.5 tokenizer; calibration set {n_cal:,} tokens, "
            f"held-out {n_held:,})"
        ),
        "",
        "| N | calibration set (ranked on it) | held-out | held-out, id order alone |",
        "|---|---|---|---|",
        *rows,
    ]
    if args.models:
        lines += [
            "",
            f"## Draft step ({args.repeats} interleaved repeats; ms)",
            "",
            "| model | draft logits over | median | min–max | vs whole head |",
            "|---|---|---|---|---|",
        ]
        for path in args.models:
            lines += step_rows(path, SIZES[1:4], args.repeats)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
