"""Images: mlxkit against mlx-vlm on the same converted directory, in one run. For one image of
256, 1,024 and 1,280 vision tokens: the time to encode it (vision tower: patches → the features
that go to its pads) and to prefill it (the whole prompt with that image through the language
model, up to the first token's logits), and the peak memory of each; the ratios are mlx-vlm's
time ÷ mlxkit's (> 1: mlxkit is faster).

    python benchmarks/vision.py                                 # the default, ~15 min on 2 cores
    python benchmarks/vision.py --vision-depth 12 --layers 24   # the whole 0.8B (hours on a CPU)

The checkpoint is a random-weight one in real shapes (benchmarks/make_checkpoint.py), by
default the 0.8B's with its text model cut to its first `--layers` (4: three Gated-DeltaNet
layers and one attention layer, one of its repeating units) and its vision tower to its first
`--vision-depth` blocks (1 of 12): every layer keeps its real width, so the per-layer work is
the real model's, and a run fits in minutes on a CPU build of MLX. It is converted once by
`mlxkit convert` (`--no-quantize`, bf16, without the MTP head, which mlx-vlm's prefill would
not run) and both tools load that directory.

Both tools get the same inputs, so only the model work is timed: the patches and grid from
mlxkit's preprocessing (transformers' Qwen2VLImageProcessor) of a random picture sized to give
exactly the vision tokens asked for, and the token ids of one chat prompt (the image, then a
line of text) with its pads expanded. Prefill: mlxkit's `decode.run_prompt` into a fresh cache,
then the last position's logits and their argmax (what `stream_generate` does before the first
token; chunks of `--prefill-chunk`, its default 512); mlx-vlm's `generate_step` with
max_tokens=0, which embeds the prompt (running the tower), prefills it in chunks of 2,048 (its
default) and samples the first token, then stops. Encode: each tool's `vision_tower(patches,
grid)` call, timed where its prefill makes it, its features evaluated on the spot (mlxkit's
prefill evaluates them there anyway; mlx-vlm's would with its first chunk), so one prefill
gives both figures and a run fits in a quarter of an hour. The outputs are compared: the
features, and the first token's log-probabilities.

Timing: one warm-up prefill per tool at the smallest image, then `--repeats` rounds; in each,
every image is prefilled once by each tool, the tools taking turns first. Times are medians
over the rounds, ratios the median of the ratios within a round (the machine's speed drifts).
Memory: `mx.get_peak_memory()` after `mx.reset_peak_memory()`, less the memory in use when the
prefill (or the tower call) began, both models' weights included there: what the call itself
needs at its peak.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import make_checkpoint
import mlx.core as mx
import numpy as np
from machine import machine
from mlxkit.convert import convert

from mlxkit.presets import sizes

RESULTS = Path(__file__).parent / "results" / "vision.md"
TOOLS = ("mlxkit", "mlx-vlm")
PROMPT_TEXT = "Describe this image in detail."


def make_model(size: str, work: Path, layers: int | None, vision_depth: int | None) -> Path:
    """A random-weight checkpoint (make_checkpoint.py, its vision tower cut to `vision_depth`
    blocks), converted to bf16 by `mlxkit convert`; the source is deleted."""
    real = make_checkpoint.model_config

    def cut(name: str) -> dict:
        config = real(name)
        if vision_depth is not None:
            config["vision_config"]["depth"] = vision_depth
        return config

    src, out = work / "hf", work / "mlx"
    make_checkpoint.model_config = cut
    try:
        make_checkpoint.make_checkpoint(size, src, layers)
    finally:
        make_checkpoint.model_config = real
    convert(src, out, quantize=False, dtype="bfloat16", mtp=False, quiet=True)
    shutil.rmtree(src)
    return out


def image_for(tokens: int, factor: int, rng: np.random.Generator) -> np.ndarray:
    """A random H×W×3 picture of exactly `tokens` merged patches (`factor` pixels a side each):
    the most nearly square grid, wider than tall (256 → 512×512, 1,280 → 1024×1280)."""
    rows = max(r for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0)
    return rng.integers(0, 256, (rows * factor, tokens // rows * factor, 3), dtype=np.uint8)


class Tower:
    """Times a model's vision tower where the prefill calls it: every call's seconds, the peak
    memory above what was in use when it began, and its features (evaluated on the spot). The
    instance's class becomes a subclass of its own whose __call__ does this, so the model's
    code calls it unchanged."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[float, int, int, mx.array]] = []
        base, log = type(model.vision_tower), self.calls

        def timed_call(tower, *args, **kwargs):
            peak_before = mx.get_peak_memory()
            mx.reset_peak_memory()
            start = mx.get_active_memory()
            t0 = time.perf_counter()
            out = base.__call__(tower, *args, **kwargs)
            mx.eval(out)
            seconds = time.perf_counter() - t0
            features = out[0] if isinstance(out, tuple) else out  # mlx-vlm's: (features, [])
            log.append((seconds, mx.get_peak_memory() - start, peak_before, features))
            return out

        timed = type(f"Timed{base.__name__}", (base,), {"__call__": timed_call})
        model.vision_tower.__class__ = timed


class Case:
    """One image: its patches and grid, the prompt's token ids, and each tool's prefill."""

    prefill_chunk = 512

    def __init__(self, kit, tokenizer, vlm, tokens: int, rng: np.random.Generator):
        from mlxkit.generate import encode_prompt
        from mlxkit.vision import preprocess_image

        pre = kit.preprocessor
        picture = image_for(tokens, pre.factor, rng)
        self.image = preprocess_image(picture, pre, max_pixels=picture.shape[0] * picture.shape[1])
        if self.image.num_tokens != tokens:
            raise SystemExit(f"{picture.shape} gave {self.image.num_tokens} tokens, not {tokens}")
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT_TEXT}]}
        ]
        self.ids = encode_prompt(tokenizer, messages, True, kit, [self.image]).tokens
        self.kit, self.vlm = kit, vlm

    @property
    def shape(self) -> str:
        h, w = self.image.size
        return f"{w}×{h}"

    def prefill(self, tool: str) -> mx.array:
        return self.prefill_mlxkit() if tool == "mlxkit" else self.prefill_vlm()

    def prefill_mlxkit(self) -> mx.array:
        """run_prompt, then the logits of the last position and the first token (greedy), as
        mlxkit's Decoder.prefill does; log-probabilities for the comparison."""
        from mlxkit.decode import run_prompt
        from mlxkit.prompt_cache import PromptCache

        cache = PromptCache.new(self.kit)
        hidden = run_prompt(self.kit, cache, self.ids, self.prefill_chunk, [self.image])
        logits = self.kit.logits(hidden)[0, -1]
        first = logits.argmax(-1)
        mx.eval(logits, first)
        logits = logits.astype(mx.float32)
        return logits - mx.logsumexp(logits)

    def prefill_vlm(self) -> mx.array:
        """generate_step up to its first token (max_tokens=0 stops there, before any decode
        step); the sampler keeps the log-probabilities it is given. The patches become an MLX
        array here, as mlxkit's do in its prefill, so that both peaks count them."""
        from mlx_vlm.generate import generate_step

        pixels, grid = mx.array(self.image.pixel_values), mx.array([self.image.grid])
        seen = []

        def greedy(logprobs: mx.array) -> mx.array:
            seen.append(logprobs)
            return mx.argmax(logprobs, axis=-1)

        steps = generate_step(
            mx.array([self.ids]),
            self.vlm,
            pixels,
            None,
            max_tokens=0,
            temperature=0.0,
            sampler=greedy,
            image_grid_thw=grid,
        )
        for _ in steps:
            raise AssertionError("max_tokens=0 yields no token")
        mx.eval(seen[0])
        return seen[0].reshape(-1)


def measure(case: Case, tool: str, tower: Tower) -> tuple[tuple, tuple, mx.array, mx.array]:
    """One prefill: (seconds, peak bytes) of the prefill and of its tower call, the first
    token's log-probabilities and the image's features."""
    tower.calls.clear()
    mx.clear_cache()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    t0 = time.perf_counter()
    logprobs = case.prefill(tool)
    seconds = time.perf_counter() - t0
    if len(tower.calls) != 1:
        raise AssertionError(f"{tool}: {len(tower.calls)} tower calls in one prefill")
    ((enc_seconds, enc_peak, peak_before, features),) = tower.calls
    peak = max(peak_before, mx.get_peak_memory()) - start
    tower.calls.clear()
    return (seconds, peak), (enc_seconds, enc_peak), logprobs, features


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def run(cases: dict[int, Case], towers: dict[str, Tower], repeats: int) -> tuple[dict, dict]:
    """{(tokens, "encode" or "prefill", tool): [(seconds, peak bytes), ...]} over the rounds,
    and the comparison of the outputs in the first round."""
    for tool in TOOLS:
        measure(cases[min(cases)], tool, towers[tool])  # warm-up: compiling, first touch
    results, checks = {}, {}
    for r in range(repeats):
        tools = TOOLS if r % 2 == 0 else TOOLS[::-1]
        for tokens, case in cases.items():
            outs = {}
            for tool in tools:
                prefill, encode, *outs[tool] = measure(case, tool, towers[tool])
                for what, (seconds, peak) in (("encode", encode), ("prefill", prefill)):
                    results.setdefault((tokens, what, tool), []).append((seconds, peak))
                print(
                    f"  round {r + 1}: {tokens:5d} tokens {tool:7s} encode {encode[0]:6.2f} s "
                    f"{encode[1] / 2**20:5.0f} MB, prefill {prefill[0]:6.2f} s "
                    f"{prefill[1] / 2**20:5.0f} MB",
                    flush=True,
                )
            if r == 0:
                (kit_lp, kit_f), (vlm_lp, vlm_f) = outs["mlxkit"], outs["mlx-vlm"]
                checks[tokens] = (
                    max_diff(kit_f, vlm_f),
                    mx.abs(kit_f.astype(mx.float32)).max().item(),
                    max_diff(kit_lp, vlm_lp),
                    kit_lp.argmax().item() == vlm_lp.argmax().item(),
                )
            del outs
    return results, checks


TABLE = """\
| vision tokens | image | prompt tokens | mlxkit s | mlx-vlm s | mlx-vlm ÷ mlxkit | mlxkit MB \
| mlx-vlm MB |
|---|---|---|---|---|---|---|---|"""

CHECKS = """\
Equal work (first round): the two towers' features, and the first token's log-probabilities \
after the prefill (bf16 weights and activations).

| vision tokens | features: max abs diff | (max abs value) | log-probs: max abs diff \
| same first token |
|---|---|---|---|---|"""


def report(cases, results, checks, repeats, info, model_info, seconds, argv) -> str:
    def times(key):
        return [s for s, _ in results[key]]

    def ratio(tokens, what):
        vlm, kit = times((tokens, what, "mlx-vlm")), times((tokens, what, "mlxkit"))
        return statistics.median(v / k for v, k in zip(vlm, kit))

    def peak(key):
        return max(p for _, p in results[key]) / 2**20

    when = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    lines = [
        "# Vision benchmark: encoding and prefilling an image, mlxkit vs mlx-vlm",
        "",
        f"Run {when}, {seconds / 60:.1f} min in all, with",
        "",
        f"    python benchmarks/vision.py {' '.join(argv)}".rstrip(),
        "",
        f"Checkpoint: {model_info}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        "",
    ]
    titles = {
        "encode": "Encode (the vision tower's call)",
        "prefill": "Prefill (the whole prompt, to the first token's logits)",
    }
    for what, title in titles.items():
        lines += [
            f"### {title}: seconds, median of {repeats} (min–max); peak MB above the weights",
            "",
            TABLE,
        ]
        for tokens, case in cases.items():
            cells = []
            for tool in TOOLS:
                ts = sorted(times((tokens, what, tool)))
                cells.append(f"{statistics.median(ts):.2f} ({ts[0]:.2f}–{ts[-1]:.2f})")
            lines.append(
                f"| {tokens:,} | {case.shape} | {len(case.ids):,} | {cells[0]} | {cells[1]} "
                f"| **{ratio(tokens, what):.2f}** | {peak((tokens, what, 'mlxkit')):,.0f} "
                f"| {peak((tokens, what, 'mlx-vlm')):,.0f} |"
            )
        lines.append("")
    lines.append(CHECKS)
    for tokens, (fd, fmax, ld, same) in checks.items():
        lines.append(
            f"| {tokens:,} | {fd:.4f} | {fmax:.2f} | {ld:.4f} | {'yes' if same else 'no'} |"
        )
    goals = ", ".join(
        f"{what} at {tokens:,} {'met' if ratio(tokens, what) >= 1.0 else '**not met**'}"
        for what in titles
        for tokens in cases
    )
    lines += ["", f"Goal (reported, not asserted), ≥ 1.0× mlx-vlm: {goals}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="0.8b", choices=sizes(), help="shapes of this size")
    ap.add_argument("--layers", type=int, default=4, help="text layers kept (first N)")
    ap.add_argument("--vision-depth", type=int, default=1, help="vision blocks kept (first N)")
    ap.add_argument("--tokens", default="256,1024,1280", help="vision tokens per image")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=512, help="mlxkit's prefill chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="the markdown report")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    info = machine()  # before the work, so the load average is the starting one
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mlxkit-vision-"))
    try:
        path = make_model(args.size, work, args.layers, args.vision_depth)
        print(f"checkpoint converted in {time.perf_counter() - t0:.0f} s", flush=True)
        import mlx_vlm

        import mlxkit

        kit, tokenizer = mlxkit.load(path)
        vlm, _ = mlx_vlm.load(str(path))
        text, vision = kit.config, kit.vision_tower.config
        model_info = (
            f"{args.size} shapes, random weights (make_checkpoint.py), text layers "
            f"{text.num_hidden_layers} (hidden {text.hidden_size}, vocab {text.vocab_size:,}), "
            f"vision blocks {vision.depth} (hidden {vision.hidden_size}, MLP "
            f"{vision.intermediate_size}, {vision.num_heads} heads, patch {vision.patch_size}, "
            f"merge {vision.spatial_merge_size}); converted by `mlxkit convert --no-quantize "
            f"--no-mtp` (bf16), {mx.get_active_memory() / 2**20:,.0f} MB of weights for both "
            f"models; mlx-vlm {mlx_vlm.__version__}; mlxkit prefill chunk {args.prefill_chunk}, "
            "mlx-vlm's 2,048."
        )
        Case.prefill_chunk = args.prefill_chunk
        rng = np.random.default_rng(args.seed)
        cases = {n: Case(kit, tokenizer, vlm, n, rng) for n in map(int, args.tokens.split(","))}
        towers = {"mlxkit": Tower(kit), "mlx-vlm": Tower(vlm)}
        results, checks = run(cases, towers, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(
        cases,
        results,
        checks,
        args.repeats,
        info,
        model_info,
        time.perf_counter() - t0,
        sys.argv[1:],
    )
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
