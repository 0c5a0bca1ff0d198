"""`mlxkit convert`. Kept free of heavy imports: it is loaded whenever the `mlxkit` command
starts, and the converter is imported only when the command runs.

The quantization options and the planning options of `--target` are the planner's knobs
(ios_bridge/settings.py, through `plan_options`), so `mlxkit plan`, `convert --target` and
`bundle build` take the same flags with the same meaning.
"""

from __future__ import annotations

import click
from mlxkit.ios_bridge.cli import bundle_options, plan_options

from mlxkit.errors import MlxkitError

# Options that only a plan reads: given without --target / --memory-budget they do nothing.
PLAN_ONLY = (
    "context",
    "entitlement",
    "num_draft",
    "prefill_chunk",
    "kv_bits",
    "kv_group_size",
    "acceptance",
    "image_tokens",
    "vision_encoder",
    "coreml_grids",
    "json_schema",
)


@click.command("convert")
@click.option("--hf-path", metavar="DIR", help="A local checkpoint in the Hugging Face layout.")
@click.option(
    "--size", help='A published size fetched from the Hub: 0.8b, 2b, 4b, 9b (or "micro").'
)
@click.option(
    "-o", "--output", metavar="OUT", help="Output directory (default: e.g. ./Qwen3.5-2B-4bit)."
)
@plan_options
@bundle_options
@click.option(
    "--bits-per-weight",
    type=float,
    metavar="B",
    help="With --recipe auto: the budget, in bits per weight of the text model, scales and "
    "biases counted (uniform 4-bit: 4.25 at group 128, 4.5 at 64, 5.0 at 32) [4.5].",
)
@click.option("--no-quantize", is_flag=True, help="Keep all weights in --dtype.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary.")
@click.pass_context
def convert(
    ctx: click.Context,
    hf_path: str | None,
    size: str | None,
    output: str | None,
    bits_per_weight: float | None,
    no_quantize: bool,
    force: bool,
    quiet: bool,
    **options,
) -> None:
    """Convert a Qwen 3.5 checkpoint to an MLX model directory (4-bit by default), in
    bounded memory, keeping the MTP head as a drafter in OUT/mtp/ and the vision tower (not
    quantized unless --vision-bits). With --target (an iPhone or tier), plan first and build
    a bundle for that phone."""
    from mlxkit.convert.converter import convert as run
    from mlxkit.convert.converter import format_summary

    from mlxkit.source import Size, resolve_local

    if (hf_path is None) == (size is None):
        raise MlxkitError("pass exactly one of --hf-path DIR or --size SIZE")
    # --size is resolved (downloaded, if need be) inside convert(), after every other check
    source = resolve_local(hf_path) if hf_path is not None else Size(size, "pass --hf-path DIR")
    if options["target"] is not None or options["memory_budget"] is not None:
        if no_quantize:
            raise MlxkitError("--target plans quantized bundles; drop --no-quantize")
        if bits_per_weight is not None:
            raise MlxkitError("--target sets the budget from the phone; drop --bits-per-weight")
        from mlxkit.ios_bridge.cli import convert_to_bundle

        convert_to_bundle(source, output, force=force, quiet=quiet, **options)
        return
    given = [n for n in PLAN_ONLY if ctx.get_parameter_source(n).name != "DEFAULT"]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise MlxkitError(f"{flags}: only with --target or --memory-budget (they plan a bundle)")
    mtp, vision = options["mtp"] is not False, options["vision"] is not False
    result = run(
        source,
        output,
        bits=options["bits"],
        group_size=options["group_size"],
        recipe="uniform" if options["recipe"] is None else options["recipe"],
        bits_per_weight=bits_per_weight,
        dtype=options["dtype"],
        quantize=not no_quantize,
        mtp=mtp,
        vision=vision,
        vision_bits=options["vision_bits"],
        draft_vocab=options["draft_vocab"],
        rounding=options["rounding"],
        force=force,
        quiet=quiet,
    )
    if not quiet:  # convert() itself only logs it
        click.echo(format_summary(result, mtp_wanted=mtp, vision_wanted=vision))
