"""Devices as data: `devices.toml` → iPhone `Device`s and `Tier`s, Apple-silicon `Mac`s, and
the `Target` a plan is made for.

The numbers live in the TOML file, not here, so that correcting a device (a new report of
its usable memory, a confirmed bandwidth) is a one-line data change that every planner
output, bundle manifest and README table picks up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from mlxkit.errors import ConfigError
from mlxkit.fields import shown, string

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEVICES_FILE = Path(__file__).parent / "devices.toml"
GB = 1_000_000_000
MB = 1_000_000
ENTITLEMENT = "com.apple.developer.kernel.increased-memory-limit"


@dataclass(frozen=True)
class Tier:
    id: str
    name: str
    ram_gb: int
    memory: str
    usable_bytes: int  # without the increased-memory-limit entitlement
    usable_bytes_entitled: int
    metal_buffer_limit: int  # bytes; the planning cap for any single array
    source: dict[str, str]
    unconfirmed: tuple[str, ...]


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    year: int
    tier: str
    soc: str
    gpu_cores: int
    ram_gb: int
    memory: str
    bandwidth: float  # bytes per second (peak)
    model_ids: tuple[str, ...]
    usable_bytes: int
    usable_bytes_entitled: int
    aliases: tuple[str, ...]
    source: dict[str, str]
    unconfirmed: tuple[str, ...]


@dataclass(frozen=True)
class Mac:
    """One memory option of an Apple-silicon chip: `m4pro-24gb`."""

    id: str
    chip: str  # "M4 Pro", or "M4 Max (14-core CPU, 32-core GPU)" for a bin
    family: str  # the id without the memory: "m4pro"
    ram_gb: int
    bandwidth: float  # bytes per second (peak)
    usable_bytes: int  # Metal's recommended GPU working set
    source: dict[str, str]
    unconfirmed: tuple[str, ...]


@dataclass(frozen=True)
class Catalog:
    min_ios: str
    metal_buffer_guaranteed: int
    sources: dict[str, str]
    tiers: dict[str, Tier]
    devices: dict[str, Device]
    macs: dict[str, Mac]

    def devices_in(self, tier_id: str) -> list[Device]:
        return [d for d in self.devices.values() if d.tier == tier_id]


@dataclass(frozen=True)
class Target:
    """What a plan is made for: one device, a whole tier (its weakest numbers), or a bare
    memory budget. `bandwidth` is None when unknown (then no speed is predicted)."""

    name: str
    label: str  # for people: "iPhone 15 (6 GB LPDDR5)"
    kind: str  # "device", "tier", "budget" (an iPhone of that much memory) or "mac"
    tier: Tier | None
    devices: tuple[Device, ...]
    usable_bytes: int
    usable_bytes_entitled: int
    bandwidth: float | None
    metal_buffer_limit: int
    min_ios: str | None  # None for a Mac
    unconfirmed: tuple[str, ...] = field(default=())

    def usable(self, entitlement: bool) -> int:
        return self.usable_bytes_entitled if entitlement else self.usable_bytes

    @property
    def model_ids(self) -> list[str]:
        return [m for d in self.devices for m in d.model_ids]


def normalize(name: str) -> str:
    """'iPhone 15 Pro', 'iphone-15-pro' and 'iphone15pro' all become 'iphone15pro'."""
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _gb(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: expected a positive number of GB, got {value!r}")
    return round(value * GB)


def _parse_macs(data: dict) -> dict[str, Mac]:
    """One Mac per memory option; usable memory from the working-set fractions."""
    share = data["mac_memory"]
    macs = {}
    for m in data.get("macs", []):
        for ram in m["memory_gb"]:
            small = ram <= share["small_ram_gb"]
            fraction = share["small_working_set_fraction" if small else "working_set_fraction"]
            mac = Mac(
                id=f"{m['id']}-{ram}gb",
                chip=m["chip"],
                family=m["id"],
                ram_gb=ram,
                bandwidth=float(m["bandwidth_gbs"]) * GB,
                usable_bytes=round(ram * fraction * GB),
                source=dict(m.get("source", {})),
                unconfirmed=(*m.get("unconfirmed", ()), "usable_gb"),
            )
            macs[mac.id] = mac
    return macs


def _parse(data: dict) -> Catalog:
    tiers = {}
    for tid, t in data["tiers"].items():
        tiers[tid] = Tier(
            id=tid,
            name=t["name"],
            ram_gb=t["ram_gb"],
            memory=t["memory"],
            usable_bytes=_gb(t["usable_gb"], f"tier {tid}"),
            usable_bytes_entitled=_gb(t["usable_gb_entitled"], f"tier {tid}"),
            metal_buffer_limit=int(t["metal_buffer_limit_mb"]) * 1024 * 1024,
            source=dict(t.get("source", {})),
            unconfirmed=tuple(t.get("unconfirmed", ())),
        )
    devices = {}
    for d in data["devices"]:
        tier = tiers[d["tier"]]
        devices[d["id"]] = Device(
            id=d["id"],
            name=d["name"],
            year=d["year"],
            tier=d["tier"],
            soc=d["soc"],
            gpu_cores=d["gpu_cores"],
            ram_gb=d["ram_gb"],
            memory=d["memory"],
            bandwidth=float(d["bandwidth_gbs"]) * GB,
            model_ids=tuple(d["model_ids"]),
            usable_bytes=_gb(d["usable_gb"], d["id"]) if "usable_gb" in d else tier.usable_bytes,
            usable_bytes_entitled=(
                _gb(d["usable_gb_entitled"], d["id"])
                if "usable_gb_entitled" in d
                else tier.usable_bytes_entitled
            ),
            aliases=tuple(d.get("aliases", ())),
            source=dict(d.get("source", {})),
            unconfirmed=tuple(d.get("unconfirmed", ())),
        )
    return Catalog(
        min_ios=data["min_ios"],
        metal_buffer_guaranteed=int(data["metal_buffer_guaranteed_mb"]) * 1024 * 1024,
        sources=dict(data["sources"]),
        tiers=tiers,
        devices=devices,
        macs=_parse_macs(data),
    )


@lru_cache(maxsize=4)
def load_catalog(path: Path = DEVICES_FILE) -> Catalog:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the device table ({e})") from None
    try:
        return _parse(data)
    except KeyError as e:
        raise ConfigError(f"{path}: missing field {e.args[0]!r}") from None


def _aliases(catalog: Catalog) -> dict[str, tuple[str, str]]:
    """normalized name → ("device" | "tier", id)."""
    table: dict[str, tuple[str, str]] = {}
    for d in catalog.devices.values():
        for name in (d.id, d.name, *d.aliases):
            table[normalize(name)] = ("device", d.id)
    for t in catalog.tiers.values():
        for name in (t.id, f"tier-{t.id}", f"tier{t.id}"):
            table[normalize(name)] = ("tier", t.id)
    for mac in sorted(catalog.macs.values(), key=lambda m: -m.ram_gb):  # smallest wins
        for name in (mac.id, mac.family, f"mac-{mac.id}", f"mac-{mac.family}"):
            table[normalize(name)] = ("mac", mac.id)
    return table


def target_names(catalog: Catalog | None = None) -> list[str]:
    catalog = catalog or load_catalog()
    return [*catalog.devices, *(f"tier-{t}" for t in catalog.tiers), *catalog.macs]


def _device_target(catalog: Catalog, device: Device) -> Target:
    tier = catalog.tiers[device.tier]
    return Target(
        name=device.id,
        label=f"{device.name} ({tier.name})",
        kind="device",
        tier=tier,
        devices=(device,),
        usable_bytes=device.usable_bytes,
        usable_bytes_entitled=device.usable_bytes_entitled,
        bandwidth=device.bandwidth,
        metal_buffer_limit=tier.metal_buffer_limit,
        min_ios=catalog.min_ios,
        unconfirmed=tuple(sorted(set(device.unconfirmed) | set(tier.unconfirmed))),
    )


def _tier_target(catalog: Catalog, tier: Tier) -> Target:
    """A tier is planned at its weakest member, so a bundle for it fits every phone in it."""
    members = catalog.devices_in(tier.id)
    return Target(
        name=f"tier-{tier.id}",
        label=f"{tier.name} tier ({', '.join(d.name for d in members)})",
        kind="tier",
        tier=tier,
        devices=tuple(members),
        usable_bytes=min(d.usable_bytes for d in members),
        usable_bytes_entitled=min(d.usable_bytes_entitled for d in members),
        bandwidth=min(d.bandwidth for d in members),
        metal_buffer_limit=tier.metal_buffer_limit,
        min_ios=catalog.min_ios,
        unconfirmed=tuple(sorted(set(tier.unconfirmed).union(*(d.unconfirmed for d in members)))),
    )


def _mac_target(catalog: Catalog, mac: Mac) -> Target:
    """A Mac plans within Metal's recommended working set; no single array is capped below
    it (a Mac's maxBufferLength is a large share of its RAM)."""
    return Target(
        name=mac.id,
        label=f"a Mac with {mac.chip}, {mac.ram_gb} GB",
        kind="mac",
        tier=None,
        devices=(),
        usable_bytes=mac.usable_bytes,
        usable_bytes_entitled=mac.usable_bytes,
        bandwidth=mac.bandwidth,
        metal_buffer_limit=mac.usable_bytes,
        min_ios=None,
        unconfirmed=mac.unconfirmed,
    )


def resolve_target(
    name: str | None = None,
    memory_budget: int | str | None = None,
    catalog: Catalog | None = None,
) -> Target:
    """A device or tier by name, optionally with its usable memory replaced by
    `memory_budget`; or, with no name, a bare budget (any device, bandwidth unknown)."""
    catalog = catalog or load_catalog()
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    if name is None:
        if budget is None:
            raise ConfigError("give a --target (see `mlxkit tiers`) or a --memory-budget")
        return Target(
            name="budget",
            label=f"a {budget / GB:.2f} GB memory budget",
            kind="budget",
            tier=None,
            devices=(),
            usable_bytes=budget,
            usable_bytes_entitled=budget,
            bandwidth=None,
            metal_buffer_limit=min(t.metal_buffer_limit for t in catalog.tiers.values()),
            min_ios=catalog.min_ios,
        )
    hit = _aliases(catalog).get(normalize(string(name, "target")))
    if hit is None:
        iphones = [*catalog.devices, *(f"tier-{t}" for t in catalog.tiers)]
        raise ConfigError(
            f"unknown target {name!r}; choose an iPhone or tier ({', '.join(iphones)}), a Mac "
            "such as m4pro-24gb (mlxkit tiers --mac), or give --memory-budget, e.g. 3.5GB, for "
            "any other device"
        )
    kind, ident = hit
    if kind == "device":
        target = _device_target(catalog, catalog.devices[ident])
    elif kind == "mac":
        target = _mac_target(catalog, catalog.macs[ident])
    else:
        target = _tier_target(catalog, catalog.tiers[ident])
    if budget is not None:
        target = replace(
            target,
            usable_bytes=budget,
            usable_bytes_entitled=budget,
            label=f"{target.label}, budget {budget / GB:.2f} GB",
        )
    return target


MAX_BUDGET = 10 * 10**12  # far above any device's memory; bounds what is planned from it
_UNITS = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_UNITS.update({f"{p}b": n for p, n in (("k", 10**3), ("m", 10**6), ("g", 10**9), ("t", 10**12))})
_UNITS.update({f"{p}ib": 2 ** (10 * i) for i, p in enumerate("kmgt", 1)})


def parse_bytes(value: int | str) -> int:
    """'3.5GB' (10^9), '3GiB' (2^30), '800MB', or a plain number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS and unit != "":
            raise ConfigError(f"not a memory size: {shown(value)} (write e.g. 3.5GB or 3000MiB)")
        n = int(Decimal(m.group(1)) * _UNITS.get(unit, 1))  # exact: no float overflow
    if n <= 0 or n > MAX_BUDGET:
        raise ConfigError(f"a memory budget must be positive and at most 10 TB, got {shown(value)}")
    return n
