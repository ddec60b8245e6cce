"""An unknown variant (`X-Variant: nope`, `"variant": "nope"`) is answered with every name that works.

The reference is behaviour, not a list: every name a request may ask for is tried on the same engine,
and the error must list exactly those that answered (`members` and `cascade` included when they
work, with a note saying what they need when they do not). In process: the engine is what the HTTP
handlers call (app.py maps UnknownNameError to 404, tests/test_service.py checks that shape).
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from fusion.errors import FusionError, UnknownNameError

CASCADE_ENV = {"FUSION_CASCADE": "mlp_0:0.9", "FUSION_AB_WEIGHTS": "ensemble=1"}


def _engine(bundle, env):
    from service import config
    from service.config import EngineConfig
    from service.engine import Engine

    eng = Engine(EngineConfig(bundle=str(bundle)), config.load(env).routing)
    eng.start()
    assert eng.ready, eng.error
    return eng


def _listed(message: str) -> set[str]:
    """The names inside `expected one of [...]` of an error message."""
    m = re.search(r"expected one of \[([^\]]*)\]", message)
    assert m, f"expected the message to list the valid names as 'expected one of [...]'; got {message!r}"
    return set(re.findall(r"'([^']+)'", m.group(1)))


def _working(eng, candidates, X) -> set[str]:
    ok = set()
    for name in candidates:
        try:
            asyncio.run(eng.predict(X, variant=name, key=None, request_id=f"probe-{name}"))
        except FusionError:
            continue
        ok.add(name)
    return ok


def _candidates(bundle) -> set[str]:
    m = json.loads((bundle / "manifest.json").read_text())
    return set(m["variants"]) | set(m["members"]) | {"members", "cascade", "nope"}


@pytest.mark.parametrize("env", [CASCADE_ENV, {}], ids=["cascade-configured", "no-cascade"])
def test_unknown_variant_lists_every_name_that_works(tiny_bundle, digits, env):
    eng = _engine(tiny_bundle, env)
    X = digits.X_test[:3]
    with pytest.raises(UnknownNameError) as exc:
        asyncio.run(eng.predict(X, variant="nope", key=None, request_id="r-nope"))
    message = str(exc.value)
    assert "unknown variant 'nope'" in message, message
    working = _working(eng, _candidates(tiny_bundle), X)
    assert "members" in working  # the tiny bundle's ensemble has its members: members mode works
    assert ("cascade" in working) == bool(env), working
    assert _listed(message) == working, f"listed {sorted(_listed(message))}; these answered: {sorted(working)}"
    if not env:
        assert "'cascade' needs a cascade configured" in message and "FUSION_CASCADE" in message, message


def test_members_listed_only_when_members_mode_works(tiny_bundle, digits, tmp_path):
    """A bundle whose ensemble lists a member the bundle lacks: members mode cannot run, and the
    error says so instead of offering it."""
    import shutil

    from fusion.bundle import manifest_version, read_bundle

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    m["variants"]["ensemble"]["members"] = [*m["variants"]["ensemble"]["members"], "not_in_bundle"]
    m["bundle_version"] = manifest_version(m)  # the service refuses a manifest whose version is not its digest
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    read_bundle(out)  # still a valid bundle: the member list is metadata
    eng = _engine(out, {})
    X = digits.X_test[:2]
    with pytest.raises(UnknownNameError) as exc:
        asyncio.run(eng.predict(X, variant="nope", key=None, request_id="r"))
    message = str(exc.value)
    assert "members" not in _listed(message) and "'members' needs" in message, message
    assert _listed(message) == _working(eng, _candidates(out), X)
    with pytest.raises(UnknownNameError, match=r"'members' needs an 'ensemble' variant.*; expected one of"):
        asyncio.run(eng.predict(X, variant="members", key=None, request_id="r2"))


@pytest.mark.server
def test_x_variant_nope_over_http_lists_the_names_that_answer(tiny_bundle, digits):
    """The issue's request itself: `X-Variant: nope` is a 404 in the one error shape whose list is
    exactly the names that answer 200 on the same server."""
    import httpx

    from tests.server import Server

    env = {**CASCADE_ENV, "FUSION_INFERENCE_TOKEN": "", "FUSION_ADMIN_TOKEN": ""}
    rows = {"inputs": digits.X_test[:2].tolist()}
    with Server(tiny_bundle, env=env) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/predict", json=rows, headers={"X-Variant": "nope"})
        assert r.status_code == 404 and set(r.json()) == {"error", "request_id"}, r.text
        answered = {n for n in _candidates(tiny_bundle)
                    if c.post("/predict", json=rows, headers={"X-Variant": n}).status_code == 200}
        oip = c.get("/v2/models/nope")  # the Open Inference Protocol's models: the same names, `fusion` besides
    assert {"members", "cascade"} <= answered
    assert _listed(r.json()["error"]) == answered, r.json()["error"]
    assert oip.status_code == 404 and "expected 'fusion' or one of [" in oip.json()["error"], oip.text
    assert _listed(oip.json()["error"].replace("'fusion' or ", "")) == answered, oip.json()["error"]
