"""`mlxkit convert`. Kept free of heavy imports: it is loaded whenever the `mlxkit` command
starts, and the converter is imported only when the command runs."""

from __future__ import annotations

import click

from mlxkit.errors import MlxkitError


@click.command("convert")
@click.option("--hf-path", type=click.Path(), help="A local checkpoint in the Hugging Face layout.")
@click.option(
    "--size", help='A published size fetched from the Hub: 0.8b, 2b, 4b, 9b (or "micro").'
)
@click.option(
    "-o", "--output", type=click.Path(), help="Output directory (default: e.g. ./Qwen3.5-2B-4bit)."
)
@click.option("--bits", type=int, help="Bits of quantized weights: 2, 3, 4, 5, 6 or 8 (default 4).")
@click.option("--group-size", type=int, help="Quantization group size: 32, 64 or 128 (default 64).")
@click.option(
    "--recipe",
    default="uniform",
    show_default=True,
    help="Named recipe in convert/recipes/ (uniform, quality).",
)
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    help="bfloat16, float16 or float32: everything not quantized (with --no-quantize, everything).",
)
@click.option("--no-quantize", is_flag=True, help="Keep all weights in --dtype.")
@click.option("--no-mtp", is_flag=True, help="Do not write the MTP drafter to OUT/mtp/.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary.")
@click.option(
    "--target",
    help="Build an iPhone bundle for this device or tier (mlxkit tiers): "
    "plans first and refuses what does not fit (see mlxkit.ios_bridge).",
)
@click.option("--memory-budget", help="With --target, or alone: usable memory, e.g. 3.5GB.")
@click.option("--context", type=int, help="With --target: the context to plan for.")
@click.option(
    "--entitlement/--no-entitlement",
    default=True,
    help="With --target: allow the increased-memory-limit entitlement.",
)
@click.pass_context
def convert(
    ctx: click.Context,
    hf_path: str | None,
    size: str | None,
    output: str | None,
    bits: int | None,
    group_size: int | None,
    recipe: str,
    dtype: str,
    no_quantize: bool,
    no_mtp: bool,
    force: bool,
    quiet: bool,
    target: str | None,
    memory_budget: str | None,
    context: int | None,
    entitlement: bool,
) -> None:
    """Convert a Qwen 3.5 checkpoint to an MLX model directory (4-bit by default), in
    bounded memory, keeping the MTP head as a drafter in OUT/mtp/."""
    from mlxkit.convert.converter import convert as run
    from mlxkit.convert.source import Size, resolve_local

    if (hf_path is None) == (size is None):
        raise MlxkitError("pass exactly one of --hf-path DIR or --size SIZE")
    if no_quantize and (bits is not None or group_size is not None):
        raise MlxkitError("--bits / --group-size have no effect with --no-quantize")
    # --size is resolved (downloaded, if need be) inside convert(), after every other check
    source = resolve_local(hf_path) if hf_path is not None else Size(size)
    if target is not None or memory_budget is not None:
        from mlxkit.ios_bridge.cli import convert_to_bundle

        recipe_given = ctx.get_parameter_source("recipe") != click.core.ParameterSource.DEFAULT
        convert_to_bundle(source, output, target=target, memory_budget=memory_budget,
                          context=context, entitlement=entitlement, bits=bits,
                          group_size=group_size, recipe=recipe if recipe_given else None,
                          dtype=dtype, mtp=False if no_mtp else None, force=force, quiet=quiet,
                          no_quantize=no_quantize)  # fmt: skip
        return
    run(
        source,
        output,
        bits=bits,
        group_size=group_size,
        recipe=recipe,
        dtype=dtype,
        quantize=not no_quantize,
        mtp=not no_mtp,
        force=force,
        quiet=quiet,
    )
