"""Quantization recipes: which weights get how many bits.

A recipe is data (`recipes/<name>.toml`): default bits and group size plus an ordered list
of rules matched against module paths. `Recipe.rule_for` is the one decision point — the
layout (`mlxkit.layout.planned_tensors`, and through it the iPhone planner) and the writer both call it, so the
bytes planned are the bytes written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlxkit import fields
from mlxkit.errors import ConfigError
from mlxkit.layout import FALLBACK_GROUP_SIZES, fitting_group_size

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

RECIPES_DIR = Path(__file__).parent / "recipes"
VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)
MODE = "affine"  # what mlx-lm, mlx-vlm and MLX Swift all read for these bit widths


def _check_bits(bits: object, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ConfigError(
            f"{where}: bits must be one of {', '.join(map(str, VALID_BITS))}, "
            f"got {fields.shown(bits)}"
        )
    return bits


def check_vision_bits(bits: object) -> int:
    """--vision-bits takes the bit widths the recipes take."""
    return _check_bits(bits, "--vision-bits")


def _check_group_size(group_size: object, where: str) -> int:
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size not in VALID_GROUP_SIZES
    ):
        raise ConfigError(
            f"{where}: group size must be one of {', '.join(map(str, VALID_GROUP_SIZES))}, "
            f"got {fields.shown(group_size)}"
        )
    return group_size


@dataclass(frozen=True)
class Rule:
    """Modules whose path matches `pattern` get these settings instead of the defaults."""

    pattern: re.Pattern
    bits: int | None = None  # None: the recipe's default
    group_size: int | None = None
    quantize: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: int
    group_size: int
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    description: str = ""
    mode: str = MODE

    def rule_for(self, path: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(bits, group_size) for the weight at `path` (a module path, or a parameter path
        ending in `.weight`) with this source `shape`; None keeps it unquantized.

        Only 2-D weights are candidates: in Qwen 3.5 those are exactly the Linear and
        Embedding weights (norms are 1-D, conv1d is 3-D). Where the group size does not divide
        the input width, the largest of 64 and 32 that does is used (`fitting_group_size`;
        config.json records it per layer); a width neither divides is refused rather than
        left unquantized under a config.json that says otherwise.
        """
        if len(shape) != 2:
            return None
        module = path.removesuffix(".weight")
        bits, group_size = self.bits, self.group_size
        for rule in self.rules:
            if rule.pattern.search(module):
                if not rule.quantize:
                    return None
                bits = rule.bits or bits
                group_size = rule.group_size or group_size
                break
        group = fitting_group_size(shape[-1], group_size)
        if group is None:
            raise ConfigError(
                f"{module} cannot be quantized: its input width {shape[-1]} is not a multiple "
                f"of {' or '.join(map(str, FALLBACK_GROUP_SIZES))}; convert with --no-quantize"
            )
        return bits, group

    def quantization_config(self, rules: dict[str, tuple[int, int] | None]) -> dict:
        """The `quantization` block of config.json for the given module → rule map, written
        as mlx-lm does: the defaults, plus one entry per module whose settings differ.
        Unquantized modules get no entry: loaders quantize a module only when its
        `.scales` tensor exists."""
        block: dict = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        for module, rule in rules.items():
            if rule is not None and rule != (self.bits, self.group_size):
                block[module] = {"group_size": rule[1], "bits": rule[0], "mode": self.mode}
        return block


AUTO = "auto"  # measured on a checkpoint (convert/sensitivity.py): no file in recipes/


def recipe_names() -> list[str]:
    return sorted([*(p.stem for p in RECIPES_DIR.glob("*.toml")), AUTO])


def load_recipe(
    name: str = "uniform", bits: int | None = None, group_size: int | None = None
) -> Recipe:
    """The recipe `convert/recipes/<name>.toml`; `bits` / `group_size` replace its defaults
    (rules that name their own bits keep them)."""
    name = fields.string(name, "recipe")
    if name == AUTO:
        raise ConfigError(
            "recipe auto is measured on a checkpoint: convert with --recipe auto "
            "--bits-per-weight B (or plan it with the checkpoint)"
        )
    path = RECIPES_DIR / f"{name}.toml"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())}")
    if tomllib is None:  # pragma: no cover
        raise ConfigError("reading recipes on Python 3.10 needs the `tomli` package")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: not a readable TOML recipe ({e})") from None
    where = f"recipe {name}"
    unknown = set(data) - {"description", "bits", "group_size", "rules"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    rules = []
    for i, raw in enumerate(fields.sequence(data.get("rules", []), f"{where}: rules")):
        rule_where = f"{where}, rule {i + 1}"
        raw = fields.mapping(raw, rule_where)
        unknown = set(raw) - {"match", "bits", "group_size", "quantize"}
        if unknown or "match" not in raw:
            raise ConfigError(f"{rule_where}: needs `match`; unknown keys {sorted(unknown)}")
        try:
            pattern = re.compile(fields.string(raw["match"], f"{rule_where}: match"))
        except re.error as e:
            raise ConfigError(f"{rule_where}: bad regular expression ({e})") from None
        rules.append(
            Rule(
                pattern,
                None if "bits" not in raw else _check_bits(raw["bits"], rule_where),
                None
                if "group_size" not in raw
                else _check_group_size(raw["group_size"], rule_where),
                fields.boolean(raw.get("quantize", True), f"{rule_where}: quantize"),
            )
        )
    return Recipe(
        name=name,
        bits=_check_bits(data.get("bits", 4) if bits is None else bits, "--bits"),
        group_size=_check_group_size(
            data.get("group_size", 64) if group_size is None else group_size, "--group-size"
        ),
        rules=tuple(rules),
        description=fields.string(data.get("description", ""), f"{where}: description"),
    )


def quantize(weight: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """Affine quantization of a block of rows. Rows are independent (groups run along the
    last axis), so quantizing a matrix in row chunks gives exactly the bytes of quantizing
    it whole — which is what lets the writer stream a 248,320-row embedding."""
    w, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits, mode=MODE)
    return w, scales, biases
