"""The per-token cost of constrained decoding's mask (mlxkit.structured, llguidance) on the real
Qwen 3.5 vocabulary: 248,320 logits per step.

    python benchmarks/make_checkpoint.py --size 0.8b --layers 4 --no-vision /tmp/q08-l4
    python benchmarks/structured.py /tmp/q08-l4 --out benchmarks/results/structured.md

Reported: the mask alone (llguidance's bitmask for the step, unpacked to an MLX boolean row),
timed on every step of constrained generations; and whole generations' milliseconds per token,
unconstrained and under a JSON Schema, with MTP off and on (2 drafts per round: under the
grammar each draft waits for its mask). A random-weight model writes nonsense, but nonsense
that the grammar checks at every step is what the mask costs; greedy, so the runs repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
from machine import machine

from mlxkit.generate import stream_generate
from mlxkit.load import load
from mlxkit.structured import Constraint

MESSAGES = [{"role": "user", "content": "The receipt as JSON."}]
NAME = {"type": "string", "maxLength": 16}
SCHEMA = {
    "type": "object",
    "properties": {
        "merchant": NAME,
        "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "lines": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "item": NAME,
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["item", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["merchant", "total", "currency", "lines"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}


def per_token_ms(model, tok, max_tokens: int, mtp: bool, constrained: bool) -> tuple:
    """Milliseconds per generated token after the prompt, the tokens generated and the share
    of drafts accepted."""
    kw = {"response_format": FORMAT} if constrained else {}
    out = stream_generate(
        model,
        tok,
        MESSAGES,
        max_tokens=max_tokens,
        enable_thinking=False,
        mtp=mtp,
        num_draft=2,
        **kw,
    )
    last = next(out)  # the prompt's time is not the mask's
    t0, n = time.perf_counter(), 0
    for last in out:
        n += 1
    return (time.perf_counter() - t0) * 1e3 / max(n, 1), n + 1, last.acceptance


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", help="a model directory (e.g. make_checkpoint.py's 0.8B, 4 layers)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="load the model in this dtype (e.g. float32)")
    ap.add_argument("--out", type=Path, help="write the markdown report here too")
    args = ap.parse_args()
    model, tok = load(args.model, dtype=getattr(mx, args.dtype) if args.dtype else None)
    vocab = model.config.vocab_size

    mask_ms: list[float] = []
    original = Constraint.mask

    def timed_mask(self):
        t0 = time.perf_counter()
        mask = original(self)
        if mask is not None:  # an array made from numpy: nothing of it is lazy
            mask_ms.append((time.perf_counter() - t0) * 1e3)
        return mask

    Constraint.mask = timed_mask
    rows = []
    for mtp in (False, True):
        for constrained in (False, True):
            runs = [
                per_token_ms(model, tok, args.max_tokens, mtp, constrained)
                for _ in range(args.repeats + 1)
            ][1:]  # the first warms up
            ms = statistics.median(r[0] for r in runs)
            rows.append((mtp, constrained, ms, runs[0][1], runs[0][2]))
    Constraint.mask = original

    base = {mtp: ms for mtp, constrained, ms, *_ in rows if not constrained}
    dtype = f" --dtype {args.dtype}" if args.dtype else ""
    command = f"python benchmarks/structured.py MODEL{dtype} --max-tokens {args.max_tokens}"
    mask_median, mask_p90 = statistics.median(mask_ms), sorted(mask_ms)[int(0.9 * len(mask_ms))]
    lines = [
        "# Constrained decoding: the mask's cost",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        (
            f"`{command} --repeats {args.repeats}`, MODEL from `make_checkpoint.py --size 0.8b "
            f"--layers {model.config.num_hidden_layers} --no-vision` (random weights, the "
            f"real tokenizer; vocabulary {vocab:,}); greedy, the median of the repeats."
        ),
        "",
        (
            f"The mask alone (llguidance's bitmask to an MLX boolean row of {vocab:,}): median "
            f"{mask_median:.2f} ms, p90 {mask_p90:.2f} ms, over {len(mask_ms):,} steps."
        ),
        "",
        "| MTP | output | ms per token | tokens | drafts accepted | vs free |",
        "|---|---|---|---|---|---|",
    ]
    for mtp, constrained, ms, n, accepted in rows:
        kind = "JSON Schema" if constrained else "free"
        drafts = f"{accepted:.0%}" if mtp else "–"
        lines.append(
            f"| {'on (2 drafts)' if mtp else 'off'} | {kind} | {ms:.2f} | {n} | {drafts} | "
            f"{ms / base[mtp]:.2f}× |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
