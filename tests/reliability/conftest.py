"""Fixtures of the reliability suite: synthetic bundles v1/v2 under one bundle root, bearer tokens,
and the shared server most HTTP cases run against (one `bentoml serve`, started once per session)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.reliability import bundles
from tests.reliability.harness import env_threads
from tests.server import Server

MAX_BODY = 1 << 20  # 1 MiB: small, so that the over-limit cases are cheap
MAX_ROWS = 256
MAX_CONCURRENCY = 32


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory) -> Path:
    """<root>/v1 and <root>/v2: same members, different weights, so different outputs and versions."""
    root = tmp_path_factory.mktemp("rel-bundles")
    bundles.make_bundle(root / "v1", seed=0)
    bundles.make_bundle(root / "v2", seed=1)
    return root


@pytest.fixture(scope="session")
def v1(bundle_root) -> Path:
    return bundle_root / "v1"


@pytest.fixture(scope="session")
def v2(bundle_root) -> Path:
    return bundle_root / "v2"


@pytest.fixture(scope="session")
def tokens() -> dict:
    return {"inference": f"inf-{secrets.token_hex(16)}", "admin": f"adm-{secrets.token_hex(16)}"}


@pytest.fixture(scope="session")
def auth(tokens) -> dict:
    """Request headers per role."""
    return {role: {"Authorization": f"Bearer {tok}"} for role, tok in tokens.items()}


@pytest.fixture(scope="session")
def main_server(v1, bundle_root, tokens):
    """The shared server: bundle v1, hot swaps allowed below the bundle root, both tokens set,
    1 MiB body limit, 256 rows, 32 requests in flight. Tests that swap bundles swap back to v1."""
    env = {
        **env_threads(), "FUSION_BUNDLE_ROOT": str(bundle_root),
        "FUSION_INFERENCE_TOKEN": tokens["inference"], "FUSION_ADMIN_TOKEN": tokens["admin"],
        "FUSION_MAX_BODY_BYTES": str(MAX_BODY), "FUSION_MAX_ROWS": str(MAX_ROWS),
        "FUSION_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    }
    srv = Server(v1, env=env).start()
    yield srv
    srv.stop()
    log = srv.log()
    leaked = [role for role, tok in tokens.items() if tok in log]
    assert not leaked, f"the server log contains the {leaked} token(s)"
    internal = [ln for ln in log.splitlines() if "internal error in request" in ln]
    assert not internal, f"the shared server answered 500 ({len(internal)}x): {internal[:3]}"
