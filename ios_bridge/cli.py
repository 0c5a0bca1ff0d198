"""`mlxkit tiers`, `mlxkit plan`, `mlxkit bundle build|verify`. Registered in mlxkit/cli.py;
MlxkitErrors (unknown target, bad context, refused plan, corrupt manifest) become one line on
stderr and exit code 2 there."""

from __future__ import annotations

import json
import sys

import click


@click.command()
def tiers() -> None:
    """Print the iPhone tiers: SoC, RAM, bandwidth, usable memory, sources."""
    from .report import format_tiers

    click.echo(format_tiers())


def _model_options(f):
    """Options shared by `plan` and `bundle build`."""
    options = [
        click.option("--target", default=None,
                     help="Device or tier, e.g. iphone15, iphone16promax, tier-8gb (mlxkit tiers)."),
        click.option("--memory-budget", default=None,
                     help="Usable bytes instead of the target's, e.g. 3.5GB."),
        click.option("--bits", type=int, default=None, help="Default bits of the recipe [4]."),
        click.option("--recipe", default=None,
                     help="Quantization recipe (convert/recipes) [plan: uniform; bundle: chosen "
                          "by the planner]."),
        click.option("--group-size", type=int, default=None),
        click.option("--context", type=int, default=None,
                     help="Context to plan for [the largest that fits]."),
        click.option("--entitlement/--no-entitlement", default=True, show_default=True,
                     help="Allow the increased-memory-limit entitlement."),
        click.option("--mtp/--no-mtp", default=None,
                     help="Include the MTP head (drafter) and its KV cache [plan: yes; bundle: "
                          "if it fits]."),
        click.option("--num-draft", default=2, show_default=True),
        click.option("--prefill-chunk", default=512, show_default=True),
        click.option("--acceptance", default=0.7, show_default=True,
                     help="MTP per-draft acceptance for the speed estimate."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


@click.command("plan")
@click.option("--size", default=None, help="0.8b, 2b, 4b or 9b.")
@click.option("--model", "model_path", default=None, help="A model directory (its config.json).")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(size: str | None, model_path: str | None, as_json: bool, **options) -> None:
    """Will a model fit an iPhone? Weights, KV cache, state, activations, max context, speed."""
    from mlxkit.errors import ConfigError

    from .plan import plan
    from .report import format_plan
    from .serialize import plan_to_dict

    if (size is None) == (model_path is None):
        raise ConfigError("give exactly one of --size or --model")
    if options["target"] is None and options["memory_budget"] is None:
        raise ConfigError("give a --target (see `mlxkit tiers`) or a --memory-budget")
    options["recipe"] = options["recipe"] or "uniform"
    options["mtp"] = True if options["mtp"] is None else options["mtp"]
    p = plan(size or model_path, **options)
    click.echo(json.dumps(plan_to_dict(p), indent=2) if as_json else format_plan(p))


@click.group()
def bundle() -> None:
    """iPhone bundles: model/ + mtp/ + manifest.json + xcode/."""


@bundle.command("build")
@click.argument("src")
@click.argument("out")
@_model_options
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def bundle_build(src: str, out: str, **options) -> None:
    """Plan for --target, convert SRC (a Hugging Face checkpoint directory) into OUT, and
    write the manifest and the Xcode files. Refuses before converting if nothing fits."""
    from .bundle import build_bundle

    manifest = build_bundle(src, out, **options)
    m = manifest["memory"]
    click.echo(
        f"{out}: {manifest['model']['name']} for {manifest['target']['label']}, "
        f"max context {manifest['max_context']:,}, peak {m['peak_bytes'] / 1e9:.2f} GB of "
        f"{m['usable_bytes'] / 1e9:.2f} GB, {len(manifest['files'])} files",
        err=True,
    )


@bundle.command("verify")
@click.argument("path")
@click.option("--target", default=None, help="Check the plan against this target instead.")
@click.option("--no-load", is_flag=True, help="Skip loading model/ (fast).")
def bundle_verify(path: str, target: str | None, no_load: bool) -> None:
    """Check a bundle: manifest schema, sizes and sha256, paths, model/ loads, plan fits."""
    from .verify import verify_bundle

    report = verify_bundle(path, target=target, load=not no_load)
    for check in report.checks:
        click.echo(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    click.echo("bundle OK" if report.ok else "bundle FAILED")
    sys.exit(0 if report.ok else 1)


def convert_to_bundle(source, output: str | None, *, no_quantize: bool, quiet: bool,
                      **options) -> None:  # fmt: skip
    """`mlxkit convert --target T`: the converter's CLI hands over here, so the bundle logic
    stays in ios_bridge. OUT defaults to e.g. ./Qwen3.5-2B-iphone15."""
    from mlxkit.errors import ConfigError

    from .bundle import build_bundle

    if no_quantize:
        raise ConfigError("--target plans quantized bundles; drop --no-quantize")
    name = options["target"] or "budget"
    out = output or f"{source.name}-{name}"
    manifest = build_bundle(source, out, quiet=quiet, **options)
    if not quiet:
        m = manifest["memory"]
        click.echo(
            f"bundle {out}: {manifest['model']['name']} for {manifest['target']['label']}; "
            f"{manifest['quantization']['recipe']} recipe, MTP "
            f"{'included' if manifest['mtp']['included'] else 'left out'}; max context "
            f"{manifest['max_context']:,}; peak {m['peak_bytes'] / 1e9:.2f} GB of "
            f"{m['usable_bytes'] / 1e9:.2f} GB usable; entitlement "
            f"{'required' if manifest['entitlement_required'] else 'not required'}"
        )
