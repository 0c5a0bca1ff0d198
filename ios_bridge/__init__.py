"""mlxkit.ios_bridge: iPhone tiers, the memory planner, and bundles for Xcode apps.

`plan("2b", "iphone15")` says whether a model fits a phone (and at which context and
speed) from its config alone; `build_bundle` converts a checkpoint into a folder an iOS
app can ship; `verify_bundle` checks such a folder.
"""

from .devices import Target, load_catalog, resolve_target
from .plan import Plan, PlanRefused, evaluate, plan


def build_bundle(*args, **kwargs):
    """See `mlxkit.ios_bridge.bundle.build_bundle` (imported lazily: it needs the converter)."""
    from .bundle import build_bundle as _build

    return _build(*args, **kwargs)


def verify_bundle(*args, **kwargs):
    """See `mlxkit.ios_bridge.verify.verify_bundle`."""
    from .verify import verify_bundle as _verify

    return _verify(*args, **kwargs)


__all__ = [
    "Plan",
    "PlanRefused",
    "Target",
    "build_bundle",
    "evaluate",
    "load_catalog",
    "plan",
    "resolve_target",
    "verify_bundle",
]
