"""BentoML's behaviour we change, applied once by the service's construction (FusionService.__init__),
never at import: importing service.app leaves BentoML as installed (tests/test_config.py).

The two patches replace methods of BentoML's internal classes, written against the versions in
BENTOML_RANGE (service/traffic.py `patch_bentoml_timeout`, service/metrics.py `patch_bentoml_metrics`).
An internal class may change in any release, so another version is refused loudly rather than patched
blindly: check the patches (tests/reliability/test_metrics_cardinality.py and the timeout tests) and
widen the range. Both patch the classes' `__call__`, looked up on each request, so the middleware
instances BentoML built before the service's construction use them too: no request is served before
FusionService() exists (BentoML builds the instance at the worker's start-up, before it listens).
"""

from __future__ import annotations

from typing import Callable

from packaging.version import InvalidVersion, Version

from fusion.errors import ConfigError

BENTOML_RANGE = ("1.4.39", "1.5")  # >= the floor in pyproject.toml, < the next minor release


def check_bentoml_version(found: str | None = None) -> str:
    """The installed BentoML version (or `found`) if the patches were written for it; else a ConfigError."""
    if found is None:
        import bentoml

        found = bentoml.__version__
    low, high = BENTOML_RANGE
    try:
        ok = Version(low) <= Version(found) < Version(high)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ConfigError(f"BentoML {found} is installed; the service patches BentoML internals written for "
                          f">= {low}, < {high} (service/patches.py): check the patches against it and widen the range")
    return found


def apply(label: Callable[[str], str]) -> None:
    """Check the version, then patch BentoML's timeout and HTTP metrics middleware (idempotent)."""
    from service.metrics import patch_bentoml_metrics
    from service.traffic import patch_bentoml_timeout

    check_bentoml_version()
    patch_bentoml_timeout()  # BentoML's per-request timer kept every request's context for 30 s (traffic.py)
    patch_bentoml_metrics(label)  # HTTP metrics labelled by route template, not raw path (metrics.py)
