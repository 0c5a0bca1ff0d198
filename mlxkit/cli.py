"""The `mlxkit` command. Subcommands live beside the code they drive; this file wires them up
and turns every MlxkitError into one line on stderr with exit code 2."""

from __future__ import annotations

import sys

import click

from mlxkit import __version__
from mlxkit.cli_options import NumDraft, kv_cache_options
from mlxkit.errors import MlxkitError

_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class _Group(click.Group):
    """Bad input of any kind — an MlxkitError, or an option click cannot parse — ends as one
    line on stderr and exit code 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # a bare `mlxkit` or `mlxkit bundle`: the help text
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            hint = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
            _fail(
                f"{e.format_message()}{hint}", 2 if isinstance(e, click.UsageError) else e.exit_code
            )
        except click.Abort:
            _fail("aborted", 1)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlxkitError as e:
            _fail(str(e), 2)
        except OSError as e:  # what the file system says (permissions, a vanished file)
            _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), 2)


def _fail(message: str, code: int):
    click.echo(f"error: {' '.join(message.splitlines())}", err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxkit")
def main() -> None:
    """Qwen 3.5 small models on MLX: convert, plan for an iPhone, bundle, generate."""


@main.command()
@click.argument("path")
def info(path: str) -> None:
    """Print a checkpoint's config summary, parameter counts by part and bytes."""
    from mlxkit.info import checkpoint_info, format_info

    click.echo(format_info(checkpoint_info(path)))


@main.command()
@click.option("--model", "model_path", help="Model directory (HF or MLX layout) or bundle.")
@click.option("--size", help='A published size (0.8b, 2b, 4b, 9b: Hugging Face cache) or "micro".')
@click.option("--prompt", required=True, help="Prompt text (a user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the chat template.")
@click.option("--no-think", is_flag=True, help="With --chat: disable the <think> block.")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temp", "temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--mtp/--no-mtp", default=True, show_default=True, help="MTP speculative decoding.")
@click.option(
    "--num-draft",
    type=NumDraft(),
    default="auto",
    show_default=True,
    help="Tokens drafted per round: auto (0-3 per round, whatever is fastest) or N.",
)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@kv_cache_options("Keep the KV cache quantized at 4 or 8 bits [not quantized: the model's dtype].")
@click.option(
    "--image", "images", multiple=True, help="An image before the prompt text (repeatable)."
)
@click.option(
    "--video", "videos", multiple=True, help="A video file before the prompt text (needs PyAV)."
)
@click.option(
    "--json-schema",
    metavar="FILE",
    help="Constrain the output to JSON valid under this JSON Schema (needs llguidance).",
)
@click.option(
    "--verbose", is_flag=True, help="Also print prompt speed, draft counts and why auto drafted."
)
def generate(
    model_path: str | None,
    size: str | None,
    prompt: str,
    chat: bool,
    no_think: bool,
    verbose: bool,
    images: tuple[str, ...],
    videos: tuple[str, ...],
    json_schema: str | None,
    **options,
) -> None:
    """Stream a completion, then a stats line (tokens/s, MTP acceptance, MLX's peak array
    memory; for a bundle, also the whole-app peak its plan budgets). Images and videos go
    before the prompt text, each capped at 1,280 vision tokens."""
    import warnings

    from mlxkit.generate import stream_generate
    from mlxkit.load import load
    from mlxkit.multimodal import prepare_images, prepare_videos

    if (model_path is None) == (size is None):
        raise MlxkitError("pass either --model PATH or --size SIZE")
    if json_schema is not None:
        from mlxkit.structured import schema_file

        options["response_format"] = schema_file(json_schema)
    if size is not None:
        from mlxkit.source import resolve_size

        model_path = resolve_size(size, "pass --model DIR").directory
    model, tokenizer = load(model_path)
    if (images or videos) and not model.has_vision:
        _refuse_coreml_vision(model_path)
    with warnings.catch_warnings(record=True) as caught:  # e.g. an image's damaged EXIF
        warnings.simplefilter("always")
        prepared = prepare_images(model, images), prepare_videos(model, videos)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    for path, image in zip(images, prepared[0]):
        if image.capped:
            (h0, w0), (h, w) = image.source_size, image.size
            click.echo(
                f"note: {path} ({w0}×{h0}) downscaled to {w}×{h} to fit the cap: "
                f"{image.num_tokens} vision tokens",
                err=True,
            )
    parts = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
    text = _vision_placeholders(len(images), len(videos)) + prompt
    if chat:
        content = [*parts, {"type": "text", "text": prompt}] if parts else prompt
        messages = [{"role": "user", "content": content}]
    else:
        messages = text
    last = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for last in stream_generate(
            model,
            tokenizer,
            messages,
            enable_thinking=not no_think,
            images=prepared[0],
            videos=prepared[1],
            **options,
        ):
            click.echo(last.text, nl=False)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    click.echo()
    click.echo(_generation_stats(last, verbose, _planned_peak(model_path)), err=True)
    if verbose and last.drafting is not None:
        click.echo(last.drafting.summary(), err=True)


@main.command()
@click.argument("model_path", metavar="PATH")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(8, 4096))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 20))
def tune(model_path: str, max_tokens: int, repeats: int) -> None:
    """Measure what MTP rounds of 0-3 drafts cost on this machine for this model and recipe,
    and cache it for --num-draft auto: a run with --seed then chooses its drafts from this
    table (never from the clock), one without corrects it as it goes."""
    from mlxkit.load import load
    from mlxkit.tune import tune as measure

    model, tokenizer = load(model_path)
    path, record = measure(
        model,
        tokenizer,
        max_tokens=max_tokens,
        repeats=repeats,
        progress=lambda line: click.echo(line, err=True),
    )
    costs = ", ".join(f"k={k} {ms:.2f}" for k, ms in enumerate(record["round_ms"]))
    depth = " ".join(f"{a:.0%}" for a in record["acceptance"])
    click.echo(f"{record['machine']}; {record['recipe']}")
    click.echo(f"ms per round {costs}; acceptance by depth {depth}")
    click.echo(f"written to {path}")


def _refuse_coreml_vision(model_path: str) -> None:
    """A bundle built with --vision-encoder coreml has no MLX tower in model/: its images are
    encoded by vision/VisionEncoder.mlpackage, which only the app runs (Core ML, on Apple
    hardware). Say that, rather than blame a text-only checkpoint."""
    from pathlib import Path

    from mlxkit.bundle_files import MANIFEST as BUNDLE_MANIFEST
    from mlxkit.bundle_files import read_manifest

    bundle = Path(model_path).expanduser()
    if not (bundle / BUNDLE_MANIFEST).is_file():
        return
    vision = read_manifest(bundle).get("vision")
    if isinstance(vision, dict) and vision.get("encoder") == "coreml":
        raise MlxkitError(
            f"{model_path}: this bundle encodes images with its Core ML package (vision/), which "
            "the app runs; mlxkit generate runs MLX, and model/ holds no MLX vision tower: "
            "build the bundle with --vision-encoder mlx to try images here"
        )


def _vision_placeholders(n_images: int, n_videos: int) -> str:
    """What a chat template writes for image and video parts, for a prompt without --chat."""
    from mlxkit.multimodal import PART_TEXT

    return PART_TEXT["image"] * n_images + PART_TEXT["video"] * n_videos


def _generation_stats(last, verbose: bool, planned: tuple[int, int] | None) -> str:
    """The line after a completion. The peak is MLX's array memory during this run, which is
    not an app's footprint: a bundle's plan budgets the whole app at its planned context."""
    from mlxkit.info import human_bytes

    stats = f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s"
    if last.drafted:
        stats += f", MTP acceptance {last.acceptance:.0%}"
        if verbose:
            stats += f" ({last.accepted}/{last.drafted} drafts)"
    stats += f", MLX array peak {human_bytes(last.peak_memory)}"
    if planned is not None:
        peak, context = planned
        stats += (
            f" (the bundle's plan: {peak / 1e9:.2f} GB for the whole app at {context:,} tokens)"
        )
    if verbose:
        stats += f", prompt {last.prompt_tokens} tokens at {last.prompt_tps:.1f} tokens/s"
    return stats


def _planned_peak(model_path: str) -> tuple[int, int] | None:
    """(peak bytes, context) from a bundle's manifest.json; None for a plain model directory
    (or a manifest without them: the bundle's own checks are `mlxkit bundle verify`'s)."""
    import json
    from pathlib import Path

    from mlxkit.bundle_files import MANIFEST as BUNDLE_MANIFEST

    path = Path(model_path).expanduser() / BUNDLE_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        peak, context = manifest["memory"]["peak_bytes"], manifest["max_context"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(peak, int) and isinstance(context, int):
        return peak, context
    return None


@main.command("eval")
@click.argument("model_path", metavar="MODEL")
@click.option(
    "--reference", required=True, metavar="SRC", help="The checkpoint MODEL was converted from."
)
@click.option("--text", "text_file", metavar="FILE", help="Your own UTF-8 text to evaluate on.")
@click.option(
    "--chat",
    "chat_file",
    metavar="FILE.jsonl",
    help='Your own conversations, one {"messages": [...], "tools": [...]} a line.',
)
@click.option("--window", default=256, show_default=True, help="Tokens per window.")
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens.")
@click.option(
    "--reference-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="bfloat16 halves the reference's memory, at the cost of its exactness.",
)
@kv_cache_options("Run MODEL on a KV cache quantized at 4 or 8 bits: the KL then counts its cost.")
@click.option(
    "--accumulation",
    type=click.Choice(["float32", "native"]),
    default="float32",
    show_default=True,
    help="How MODEL's quantized matmuls sum: in float32, as Apple GPUs do (the figures a Mac "
    "or an iPhone gets), or as this machine's MLX backend does (on a CPU, bfloat16 inputs "
    "sum in bfloat16, which costs top-1 of its own).",
)
@click.option("--json", "json_path", metavar="PATH", help="Also write the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(
    model_path: str,
    reference: str,
    text_file: str | None,
    chat_file: str | None,
    json_path: str | None,
    **options,
) -> None:
    """Measure a converted model or bundle against its source checkpoint: KL(source ‖ model),
    top-1 agreement, perplexity and MTP acceptance, per token, on held-out text (built in:
    code, prose, other languages, chat and tool-call turns in the model's chat template)."""
    import json

    from mlxkit.quality import format_quality, json_output, measure_quality, read_chat, read_text

    out = json_output(json_path) if json_path is not None else None
    text = read_text(text_file) if text_file is not None else None
    chat = read_chat(chat_file) if chat_file is not None else None
    result = measure_quality(model_path, reference, text=text, chat=chat, keep=True, **options)
    click.echo(format_quality(result, model_path, reference))
    if out is not None:
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")


def _register_subcommands() -> None:
    """Subcommands that live beside the code they drive (imported here, after `main` exists)."""
    from mlxkit.convert.cli import convert
    from mlxkit.convert.coreml import export_coreml
    from mlxkit.ios_bridge.cli import bundle, plan_command, tiers
    from mlxkit.serve.cli import serve

    for command in (convert, export_coreml, tiers, plan_command, bundle, serve):
        main.add_command(command)


_register_subcommands()
