"""`mlxkit tune MODEL`: measures once what a round of k drafts costs on this machine (k = 0: a
plain decode step) and the acceptance per draft depth, for num_draft="auto"
(`mlxkit.draft_control`), and caches them under the user cache directory
($XDG_CACHE_HOME, else ~/.cache, then mlxkit/tune/), keyed by machine, model digest and recipe.

Why a cache: a run with a seed (or deterministic=True) must choose its drafts without looking
at the clock, so that the same seed gives the same text on a busy machine; it then uses this
table, measured when the machine was quiet, or a default shape where there is none.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mlxkit.draft_control import K_MAX, TUNE_VERSION, machine_id, model_digest, recipe, table_path
from mlxkit.errors import MlxkitError
from mlxkit.generate import stream_generate
from mlxkit.models.qwen3_5 import Model

# Code and prose, as the benchmarks decode: what a draft head meets in use.
TUNE_PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "The three most important things to know about the weather are",
]


def tune(
    model: Model,
    tokenizer,
    *,
    max_tokens: int = 64,
    repeats: int = 3,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[Path, dict]:
    """Times greedy decoding of TUNE_PROMPTS with k = 0 (MTP off), 1, .., K_MAX drafts per
    round, the ks taking turns, and writes the median milliseconds per round and the
    acceptance per depth measured at k = K_MAX. Returns the file and what it holds."""
    if not model.has_mtp:
        raise MlxkitError("this model has no MTP weights: there are no drafts to tune")
    per_round: dict[int, list[float]] = {k: [] for k in range(K_MAX + 1)}
    depth: list[tuple[float, ...]] = []
    for rep in range(repeats + 1):  # the first pass warms up and is not kept
        for k in range(K_MAX + 1):
            seconds = rounds = 0.0
            for prompt in TUNE_PROMPTS:
                options = {"mtp": False} if k == 0 else {"num_draft": k}
                stream = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **options)
                t0 = last = None
                for last in stream:
                    t0 = t0 if t0 is not None else time.perf_counter()
                seconds += time.perf_counter() - t0
                # the clock starts at the first response, which ends the first round
                rounds += (last.generation_tokens if k == 0 else sum(last.drafting.rounds)) - 1
                if k == K_MAX and rep:
                    depth.append(last.drafting.acceptance[:K_MAX])
            if rep:
                per_round[k].append(1e3 * seconds / max(rounds, 1))
        progress(f"pass {rep + 1} of {repeats + 1}")
    record = {
        "version": TUNE_VERSION,
        "machine": machine_id(),
        "model": model_digest(model),
        "recipe": recipe(model),
        "round_ms": [statistics.median(per_round[k]) for k in range(K_MAX + 1)],
        "acceptance": [statistics.median(d[j] for d in depth) for j in range(K_MAX)],
        "max_tokens": max_tokens,
        "repeats": repeats,
    }
    path = table_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path, record
