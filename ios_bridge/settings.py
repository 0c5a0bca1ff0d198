"""The planner's knobs, defined once.

`Settings` is what a plan is made with. Each field's metadata is also its command-line
option: `mlxkit plan`, `mlxkit convert` and `mlxkit bundle build` build their options from
these fields (ios_bridge/cli.py), and `plan()`, `evaluate()`, `choose_plan()` and
`build_bundle()` take the same names as keyword arguments. Adding a knob means adding a
field here and nowhere else.

This module imports nothing the `mlxkit` command does not load anyway (it reads it at
start-up): the image cap comes from the runtime's vision module, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields

import click

from mlxkit.cli_options import NumDraft
from mlxkit.vision import DEFAULT_MAX_IMAGE_TOKENS

# Runtime reserve: what the app process holds besides MLX arrays. Not measurable here
# (no iPhone); an itemised estimate, overridable with `reserve=`:
#   ~40 MB  app binary, Swift runtime, UIKit/SwiftUI dirty memory of a small app
#   ~100 MB tokenizer: swift-transformers parses the 11 MB tokenizer.json (248k vocab and
#           merges) into Swift strings and dictionaries
#   ~60 MB  MLX runtime: Metal library and compiled pipelines, command buffers, residency
#   ~56 MB  margin for allocator fragmentation and the app's own UI/data
DEFAULT_RESERVE = 256 * 2**20
# MLX keeps freed buffers for reuse up to this limit; on a phone they count against the
# jetsam limit, so the limit is set small (what the MLX Swift example apps use) and counted.
DEFAULT_CACHE_LIMIT = 20 * 2**20
# What encodes images on the phone: MLX (the tower in model/, mlx-swift-lm's VLM loader) or
# Core ML (vision/VisionEncoder.mlpackage, meant for the Neural Engine; model/ then has no tower).
VISION_ENCODERS = ("mlx", "coreml")
# The mlx-swift-lm versions a bundle's Swift can be written against (runtimes.py says what each
# is): a main-branch commit with the Qwen 3.5 MTP drafters (the default: MTP on the phone is
# what the drafter in mtp/ is for), and the newest release, which has none.
SWIFT_RUNTIMES = ("1441444", "3.31.4")
DEFAULT_SWIFT_RUNTIME = "1441444"
MIN_CONTEXT = 512  # a plan with less room than this is refused: not a useful chat
# KV cache precisions a plan can choose, preferred first: 16 is the activation dtype (not
# quantized); 8 and 4 are mlx-swift-lm's GenerateParameters.kvBits (mlxkit.cache.KV_BITS).
KV_BITS = (16, 8, 4)
# Prefill chunks a plan can choose, preferred (fastest) first: at long context the attention
# scores of one chunk against the whole cache grow with the chunk, so a smaller one holds more.
PREFILL_CHUNKS = (512, 256, 128, 64, 32)
DEFAULT_CONTEXT = 4096  # what an automatic choice (choose_plan) leaves room for, when it can


def _knob(default: object, help: str, flag: str | None = None, **option: object) -> Field:
    """A field with its command-line option: `flag` (None: not on the command line) and
    extra `click.option` arguments. `cli_default` (when given) replaces the field's default
    on the command line; None there means "the planner chooses" (see choose_plan)."""
    return field(default=default, metadata={"help": help, "flag": flag, "option": option})


@dataclass(frozen=True)
class Settings:
    recipe: str = _knob(
        "uniform",
        "Quantization recipe in convert/recipes/: uniform or quality "
        "[plan, --target: the first that leaves room for 4,096 tokens; convert: uniform].",
        "--recipe",
        cli_default=None,
    )
    bits: int | None = _knob(
        None,
        "Default bits of quantized weights: 2, 3, 4, 5, 6 or 8 [the recipe's: 4].",
        "--bits",
        type=int,
    )
    group_size: int | None = _knob(
        None,
        "Quantization group size: 32, 64 or 128 [the recipe's: 64].",
        "--group-size",
        type=int,
    )
    rounding: str = _knob(
        "nearest",
        "How quantized weights are rounded: to the nearest level, or by GPTQ on the "
        "calibration set (the decoder layers' linears; slower to convert and more memory, "
        "lower KL at the same bytes; plan and --target never pick it unless asked).",
        "--rounding",
        metavar="nearest|gptq",
    )
    dtype: str = _knob(
        "bfloat16",
        "bfloat16, float16 or float32: everything not quantized (with --no-quantize, all).",
        "--dtype",
    )
    mtp: bool = _knob(
        True,
        "Keep the MTP head (the drafter) [convert: yes; plan, --target: if it fits].",
        "--mtp/--no-mtp",
        cli_default=None,
    )
    vision: bool = _knob(
        True,
        "Keep the vision tower (images and video) when the checkpoint has one [convert: yes; "
        "plan, --target: if it fits, before MTP].",
        "--vision/--no-vision",
        cli_default=None,
    )
    vision_bits: int | None = _knob(
        None,
        "Quantize the vision tower's linear layers to 2, 3, 4, 5, 6 or 8 bits [not quantized: "
        "--dtype].",
        "--vision-bits",
        type=int,
    )
    image_tokens: int = _knob(
        DEFAULT_MAX_IMAGE_TOKENS,
        "Vision tokens of the largest image the plan leaves room for: the activations of "
        "encoding it and its tokens in the context (mlxkit and MLX Swift cap images here; "
        "with --vision-encoder coreml the largest grid is the cap).",
        "--image-tokens",
        type=int,
    )
    vision_encoder: str = _knob(
        "mlx",
        "What encodes images in the app: mlx (the tower in model/, read by mlx-swift-lm's VLM "
        "loader) or coreml (vision/VisionEncoder.mlpackage for the Neural Engine, float16, one "
        "function per grid; model/ then holds no tower; building needs the coreml extra).",
        "--vision-encoder",
        type=click.Choice(VISION_ENCODERS),
    )
    coreml_grids: str | None = _knob(
        None,
        "With --vision-encoder coreml: the patch grids ROWSxCOLS,... of its functions [square, "
        "3:4 and 4:3 at about 256, 576 and 1,024 vision tokens].",
        "--coreml-grids",
    )
    swift_runtime: str = _knob(
        DEFAULT_SWIFT_RUNTIME,
        "The mlx-swift-lm the bundle's Swift is written against: 1441444 (a main-branch commit, "
        "pinned by revision, with the MTP drafter) or 3.31.4 (the newest release: no Qwen 3.5 "
        "drafter, so no mtp/).",
        "--swift-runtime",
        type=click.Choice(SWIFT_RUNTIMES),
    )
    entitlement: bool = _knob(
        True,
        "Allow the increased-memory-limit entitlement (iPhones); it is asked for only when "
        "the plan needs it.",
        "--entitlement/--no-entitlement",
    )
    num_draft: int | str = _knob(
        2,
        "Drafts per MTP round in mlxkit's decode loop (what a Mac runs), or auto: as many "
        "as the cost model predicts fastest, up to 3 (memory is planned for 3); the phone's "
        "mlx-swift-lm drafts 1 per round whatever this says.",
        "--num-draft",
        type=NumDraft(),
    )
    draft_vocab: int | None = _knob(
        None,
        "Draft over the N tokens most frequent on the calibration set, written beside the "
        "drafter (mtp/draft_vocab.json, counted in its bytes; asks for the drafter): a cheaper "
        "draft step in mlxkit's loop, the output unchanged (verification keeps the whole "
        "vocabulary). MLX Swift ignores the file: the phone drafts over the whole head [the "
        "whole vocabulary].",
        "--draft-vocab",
        type=int,
        metavar="N",
    )
    kv_bits: int = _knob(
        16,
        "KV cache precision: 16 (not quantized), 8 or 4 bits [plan, --target: the first of 16, "
        "8, 4 that reaches --context, or else the longest context, up to the model's].",
        "--kv-bits",
        type=int,
        cli_default=None,
    )
    kv_group_size: int = _knob(
        64, "KV cache quantization group size: 32, 64 or 128.", "--kv-group-size", type=int
    )
    prefill_chunk: int = _knob(
        512,
        "Prompt tokens per prefill step [plan, --target: the largest of 512, 256, 128, 64, 32 "
        "that reaches the context, with the KV cache precision].",
        "--prefill-chunk",
        type=int,
        cli_default=None,
    )
    acceptance: float = _knob(
        0.7, "MTP per-draft acceptance for the speed estimate.", "--acceptance", type=float
    )
    reserve: int = _knob(DEFAULT_RESERVE, "Runtime reserve in bytes (app, tokenizer, MLX).")
    cache_limit: int = _knob(DEFAULT_CACHE_LIMIT, "MLX buffer-cache limit in bytes.")


def knobs() -> tuple[Field, ...]:
    """The fields of Settings, in order (each with `.metadata` for its option)."""
    return fields(Settings)


def knob_names() -> frozenset[str]:
    return frozenset(f.name for f in fields(Settings))
