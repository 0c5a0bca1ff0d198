"""mlxkit.ios_bridge: iPhone tiers, the memory planner, and bundles for Xcode apps.

`plan("2b", "iphone15")` says whether a model fits a phone or a Mac (and at which context
and speed) from its config alone; `choose_plan` picks the recipe, MTP and memory limit the
way `mlxkit plan` and `convert --target` do; `refusal_message` says what fits instead of a
refused plan; `build_bundle` converts a checkpoint into a folder an iOS app can ship;
`verify_bundle` checks such a folder.
"""

from .choose import choose_plan
from .devices import Target, load_catalog, resolve_target
from .plan import Plan, PlanRefused, evaluate, plan
from .refusal import refusal_message
from .settings import Settings


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
    "Settings",
    "Target",
    "build_bundle",
    "choose_plan",
    "evaluate",
    "load_catalog",
    "plan",
    "refusal_message",
    "resolve_target",
    "verify_bundle",
]
