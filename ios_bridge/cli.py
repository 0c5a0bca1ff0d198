"""`mlxkit tiers`, `mlxkit plan`, `mlxkit bundle build|verify`, and the options `mlxkit convert`
shares with them. Registered in mlxkit/cli.py; MlxkitErrors (unknown target, bad context,
refused plan, corrupt manifest) become one line on stderr and exit code 2 there.

The planning options are built from `Settings` (settings.py), so the commands and the
Python API take the same knobs under the same names.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from .settings import knobs

TARGET_HELP = (
    "An iPhone or tier (iphone15, tier-8gb: mlxkit tiers) or a Mac (m4pro-24gb: mlxkit tiers "
    "--mac; plan only: bundles are for iPhones)."
)


def _knob_option(knob) -> Callable:
    meta = dict(knob.metadata)
    extra = dict(meta["option"])
    default = extra.pop("cli_default", knob.default)
    if meta["flag"].startswith("--") and "/" in meta["flag"]:  # an on/off switch
        return click.option(meta["flag"], knob.name, default=default, help=meta["help"])
    shown = default is not None
    return click.option(
        meta["flag"], knob.name, default=default, show_default=shown, help=meta["help"], **extra
    )


def plan_options(f: Callable) -> Callable:
    """--target, --memory-budget, --context, and one option per Settings field that has a
    flag (in the order of the dataclass)."""
    options = [
        click.option("--target", default=None, help=TARGET_HELP),
        click.option("--memory-budget", default=None, help="Usable memory, e.g. 3.5GB."),
        click.option(
            "--context", type=int, default=None, help="Context to plan for [the largest that fits]."
        ),
        *(_knob_option(k) for k in knobs() if k.metadata["flag"]),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def bundle_options(f: Callable) -> Callable:
    """--json-schema: what a bundle carries beyond its plan (`bundle build`, `convert
    --target`)."""
    return click.option(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="A JSON Schema the app's prompts use: checked, written beside manifest.json "
        "(json_schema.json, its json_schema_path), and the Swift glue compiles it for "
        "mlx-swift-lm's guided generation (MLXGuidedGeneration).",
    )(f)


@contextmanager
def what_fits_instead() -> Iterator[None]:
    """The refusal message belongs to whoever catches the refusal: a command adds what
    would fit (a search plan() does not pay for)."""
    from .plan import PlanRefused
    from .refusal import refusal_message

    try:
        yield
    except PlanRefused as refused:
        refused.args = (refusal_message(refused),)
        raise


@click.command()
@click.option("--mac", is_flag=True, help="The Apple-silicon Macs instead of the iPhones.")
def tiers(mac: bool) -> None:
    """Print the iPhone tiers (or the Macs): bandwidth, usable memory, sources."""
    from .report import format_macs, format_tiers

    click.echo(format_macs() if mac else format_tiers())


@click.command("plan")
@click.option("--size", default=None, help="0.8b, 2b, 4b, 9b or micro.")
@click.option("--model", "model_path", default=None, help="A model directory (its config.json).")
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(size: str | None, model_path: str | None, as_json: bool, **options) -> None:
    """Will a model fit a target? Weights, KV cache, state, activations, max context, speed:
    the same recipe, MTP and memory-limit choice `mlxkit convert --target` makes."""
    from mlxkit.errors import ConfigError

    from .choose import choose_plan
    from .report import format_plan
    from .serialize import plan_to_dict

    if (size is None) == (model_path is None):
        raise ConfigError("give exactly one of --size or --model")
    if options["target"] is None and options["memory_budget"] is None:
        raise ConfigError("give a --target (see `mlxkit tiers`) or a --memory-budget")
    with what_fits_instead():
        p = choose_plan(size or model_path, **options)
    click.echo(json.dumps(plan_to_dict(p), indent=2) if as_json else format_plan(p))


@click.group()
def bundle() -> None:
    """iPhone bundles: model/ + mtp/ + manifest.json + xcode/."""


@bundle.command("build")
@click.argument("src")
@click.argument("out")
@plan_options
@bundle_options
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def bundle_build(src: str, out: str, **options) -> None:
    """Plan for --target, convert SRC (a Hugging Face checkpoint directory) into OUT, and
    write the manifest and the Xcode files. Refuses before converting if nothing fits."""
    from .bundle import build_bundle
    from .report import bundle_line

    with what_fits_instead():
        manifest = build_bundle(src, out, **options)
    click.echo(bundle_line(out, manifest), err=True)


@bundle.command("verify")
@click.argument("path")
@click.option("--target", default=None, help="Check the plan against this target instead.")
@click.option("--no-load", is_flag=True, help="Skip loading model/ (fast).")
@click.option(
    "--quality",
    is_flag=True,
    help="Also measure the bundle against --reference (mlxkit eval, on the manifest's "
    "evaluation set and tokens) and fail beyond the tolerance of the manifest's quality figures "
    "(measured: KL 10 %, top-1 2 points, perplexity 5 %; predicted: 6x the KL).",
)
@click.option(
    "--reference", metavar="SRC", default=None, help="With --quality: the source checkpoint."
)
def bundle_verify(
    path: str, target: str | None, no_load: bool, quality: bool, reference: str | None
) -> None:
    """Check a bundle: manifest schema, sizes and sha256, paths, model/ loads, plan fits; with
    --quality, its quality against the source."""
    from mlxkit.errors import ConfigError

    from .verify import verify_bundle

    if quality != (reference is not None):
        raise ConfigError(
            "--quality measures against the source: pass both --quality and --reference SRC"
        )
    report = verify_bundle(path, target=target, load=not no_load, quality_reference=reference)
    for check in report.checks:
        click.echo(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    if report.ok:
        click.echo("bundle OK")
        return
    failed = [c.name for c in report.checks if not c.ok]
    click.echo(f"bundle FAILED: {', '.join(failed)}", err=True)
    sys.exit(1)


def convert_to_bundle(source, output: str | None, *, quiet: bool, **options) -> None:
    """`mlxkit convert --target T`: the converter's CLI hands over here, so the bundle logic
    stays in ios_bridge. OUT defaults to e.g. ./Qwen3.5-2B-iphone15."""
    from .bundle import build_bundle
    from .report import bundle_line

    out = output or f"{source.name}-{options['target'] or 'budget'}"
    with what_fits_instead():
        manifest = build_bundle(source, out, quiet=quiet, **options)
    if not quiet:
        click.echo(bundle_line(out, manifest))
