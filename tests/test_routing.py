"""Routing policy, pure (no server): stable hash, weighted split, parsing and validation.

The references here are independent of service/routing.py: the hash is recomputed with hashlib
from its documented definition, the split is judged against scipy's binomial interval, and
cross-process stability is checked in fresh interpreters with different hash seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from scipy.stats import binom

from fusion.errors import ConfigError
from service.routing import CASCADE, Cascade, RoutingPolicy, parse_weights, stable_unit

ROOT = Path(__file__).resolve().parents[1]
KEYS = [f"user-{i}" for i in range(100)] + ["ünïcødé-ключ-鍵", "a" * 1000, "x-variant: mlp_0"]


def reference_unit(key: str) -> float:
    """The documented definition: the first 8 bytes of SHA-256(utf-8 key), big-endian, over 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


# ---- stable hash -------------------------------------------------------------------------------


def test_stable_unit_matches_its_definition_and_lies_in_unit_interval():
    for key in KEYS + [""]:
        u = stable_unit(key)
        assert 0.0 <= u < 1.0
        assert u == reference_unit(key)


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_stable_hash_and_choice_identical_in_other_processes(hashseed):
    """Another interpreter (different PYTHONHASHSEED, so `hash()` differs) routes every key the same."""
    code = (
        "import json, sys\n"
        "from service.routing import RoutingPolicy, stable_unit\n"
        "keys = json.loads(sys.stdin.read())\n"
        "p = RoutingPolicy(weights={'ensemble': 0.5, 'mlp_0': 0.3, 'merged': 0.2})\n"
        "print(json.dumps({'u': [stable_unit(k) for k in keys], 'v': [p.choose(k) for k in keys],"
        " 'h': [hash(k) for k in keys[:3]]}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(KEYS), capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    other = json.loads(proc.stdout)
    here = RoutingPolicy(weights={"ensemble": 0.5, "mlp_0": 0.3, "merged": 0.2})
    assert other["u"] == [stable_unit(k) for k in KEYS]
    assert other["v"] == [here.choose(k) for k in KEYS]
    assert len(set(other["v"])) == 3  # the 103 keys really reach all three variants


def test_empty_key_is_no_key_and_routes_at_random():
    """An empty X-Routing-Key is treated as absent (the app passes `header or None`): not sticky."""
    p = RoutingPolicy(weights={"ensemble": 0.5, "mlp_0": 0.5})
    assert {p.choose("", random.Random(i)) for i in range(64)} == {"ensemble", "mlp_0"}


def test_choice_is_the_cumulative_weight_bucket_of_the_hash():
    """Independent reference: variants sorted by name, buckets [0, w1), [w1, w1+w2), ..."""
    p = RoutingPolicy(weights={"mlp_0": 1, "ensemble": 2, "merged": 1})
    names, cuts = ["ensemble", "merged", "mlp_0"], [0.5, 0.75, 1.0]
    for key in KEYS:
        u = reference_unit(key)
        expected = next(n for n, c in zip(names, cuts) if u < c)
        assert p.choose(key) == expected


@pytest.mark.parametrize("weights", [{"ensemble": 0.5, "mlp_0": 0.5}, {"ensemble": 0.8, "merged": 0.2},
                                     {"a": 1.0, "b": 1.0, "c": 2.0}])
def test_keyed_split_of_5000_requests_within_binomial_interval(weights):
    p = RoutingPolicy(weights=weights)
    n = 5000
    counts = Counter(p.choose(f"request-key-{i}") for i in range(n))
    total = sum(weights.values())
    assert set(counts) == set(weights)
    for name, w in weights.items():
        lo, hi = binom.interval(0.999, n, w / total)
        assert lo <= counts[name] <= hi, (name, counts, (lo, hi))


def test_unkeyed_split_is_random_but_weighted():
    p = RoutingPolicy(weights={"ensemble": 0.3, "mlp_0": 0.7})
    rng = random.Random(7)
    n = 5000
    counts = Counter(p.choose(None, rng) for _ in range(n))
    lo, hi = binom.interval(0.999, n, 0.3)
    assert lo <= counts["ensemble"] <= hi


def test_zero_weight_variant_never_chosen():
    p = RoutingPolicy(weights={"ensemble": 1.0, "mlp_0": 0.0})
    assert {p.choose(f"k{i}") for i in range(2000)} == {"ensemble"}
    assert {p.choose(None, random.Random(i)) for i in range(200)} == {"ensemble"}


# ---- parsing -------------------------------------------------------------------------------------


def test_parse_weights():
    assert parse_weights("ensemble=0.5, merged=0.5") == {"ensemble": 0.5, "merged": 0.5}
    assert parse_weights("ensemble") == {"ensemble": 1.0}
    assert parse_weights(" ensemble=2,,mlp_0=1 ,") == {"ensemble": 2.0, "mlp_0": 1.0}
    assert parse_weights("") == {}


@pytest.mark.parametrize("text", ["ensemble=abc", "ensemble=0.5,merged=", "a=1=2"])
def test_parse_weights_errors_name_the_bad_part(text):
    with pytest.raises(ConfigError, match="name=number"):
        parse_weights(text)


def test_policy_normalises_weights():
    p = RoutingPolicy(weights={"mlp_0": 1, "ensemble": 3})
    assert p.weights == {"ensemble": 0.75, "mlp_0": 0.25}
    assert list(p.weights) == ["ensemble", "mlp_0"]


@pytest.mark.parametrize("weights, match", [
    ({}, "at least one"),
    ({"ensemble": -1.0}, "non-negative"),
    ({"ensemble": float("nan")}, "non-negative"),
    ({"ensemble": float("inf")}, "non-negative"),
    ({"ensemble": 0.0, "mlp_0": 0.0}, "positive total"),
    ({"ensemble": 1.0, CASCADE: 1.0}, "no cascade"),
])
def test_policy_rejects_bad_weights(weights, match):
    with pytest.raises(ConfigError, match=match):
        RoutingPolicy(weights=weights)


def test_policy_from_env():
    from service import config

    p = config.load({"FUSION_AB_WEIGHTS": "ensemble=1,mlp_0=3", "FUSION_SHADOW": " mlp_1 , members ,",
                     "FUSION_CASCADE": "mlp_0:0.8"}).routing
    assert p.weights == {"ensemble": 0.25, "mlp_0": 0.75}
    assert p.shadow == ("mlp_1", "members")
    assert p.cascade == Cascade("mlp_0", 0.8, "ensemble")
    default = config.load({}).routing
    assert default.weights == {"ensemble": 1.0} and default.shadow == () and default.cascade is None


def test_check_against_names_every_missing_variant():
    p = RoutingPolicy(weights={"ensemble": 1, "merged": 1}, shadow=("distilled",), cascade=Cascade("mlp_9", 0.5))
    with pytest.raises(ConfigError) as err:
        p.check_against({"ensemble", "mlp_0"})
    for name in ("merged", "distilled", "mlp_9"):
        assert name in str(err.value)
    assert "a weight on 'cascade' routes to the cascade" in str(err.value)
    assert p.check_against({"ensemble", "merged", "distilled", "mlp_9"}) is p


# ---- from_dict (the admin endpoint's body) ------------------------------------------------------------


def test_from_dict_keeps_absent_fields_and_replaces_given_ones():
    current = RoutingPolicy(weights={"ensemble": 1.0}, shadow=("mlp_1",), cascade=Cascade("mlp_0", 0.9))
    p = RoutingPolicy.from_dict({"weights": {"ensemble": 1, "mlp_0": 1}}, current)
    assert p.weights == {"ensemble": 0.5, "mlp_0": 0.5}
    assert p.shadow == ("mlp_1",) and p.cascade == current.cascade
    p2 = RoutingPolicy.from_dict({"weights": "mlp_0=1", "shadow": [], "cascade": None}, p)
    assert p2.weights == {"mlp_0": 1.0} and p2.shadow == () and p2.cascade is None
    p3 = RoutingPolicy.from_dict({"cascade": {"cheap": "mlp_0", "threshold": 0.25, "fallback": "members"}}, p2)
    assert p3.cascade == Cascade("mlp_0", 0.25, "members")
    # round trip through to_dict, and through what GET /admin/routing answers (request_id and all)
    assert RoutingPolicy.from_dict(p3.to_dict()) == p3
    assert RoutingPolicy.from_dict({**p3.to_dict(), "request_id": "abc"}) == p3


@pytest.mark.parametrize("body, match", [
    ([1, 2], "JSON object"),
    ({"weights": {"ensemble": 1}, "extra": 1}, "unexpected fields"),
    ({"weights": [1, 2]}, "variant -> number"),
    ({"weights": {"ensemble": "1"}}, "variant -> number"),
    ({"weights": {"ensemble": True}}, "variant -> number"),
    ({"weights": {"ensemble": -2}}, "non-negative"),
    ({"weights": {}}, "at least one"),
    ({"shadow": "mlp_1"}, "list of variant names"),
    ({"shadow": [1]}, "list of variant names"),
    ({"cascade": "mlp_0:0.5"}, "cheap, threshold"),
    ({"cascade": {"cheap": "mlp_0"}}, "cheap, threshold"),
    ({"cascade": {"cheap": "mlp_0", "threshold": 0.5, "other": 1}}, "cheap, threshold"),
    ({"cascade": {"cheap": "mlp_0", "threshold": "high"}}, "number threshold"),
    ({"cascade": {"cheap": "mlp_0", "threshold": 1.5}}, r"\[0, 1\]"),
    ({"cascade": {"cheap": "ensemble", "threshold": 0.5}}, "must differ"),
    ({"weights": {"cascade": 1}, "cascade": None}, "no cascade"),
])
def test_from_dict_validation(body, match):
    with pytest.raises(ConfigError, match=match):
        RoutingPolicy.from_dict(body, RoutingPolicy())


# ---- cascade -----------------------------------------------------------------------------------------


def test_cascade_parse():
    assert Cascade.parse("") is None and Cascade.parse("   ") is None
    assert Cascade.parse("distilled:0.9") == Cascade("distilled", 0.9, "ensemble")
    assert Cascade.parse(" mlp_0 :0:members") == Cascade("mlp_0", 0.0, "members")
    assert Cascade.parse("mlp_0:1").to_dict() == {"cheap": "mlp_0", "threshold": 1.0, "fallback": "ensemble"}


@pytest.mark.parametrize("text, match", [
    ("mlp_0", "cheap_variant:threshold"),
    ("mlp_0:", "cheap_variant:threshold"),
    ("mlp_0:high", "cheap_variant:threshold"),
    ("mlp_0:1.5", r"\[0, 1\]"),
    ("mlp_0:-0.1", r"\[0, 1\]"),
    ("mlp_0:nan", r"\[0, 1\]"),
    ("ensemble:0.5", "must differ"),
    ("mlp_0:0.5:mlp_0", "must differ"),
])
def test_cascade_parse_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        Cascade.parse(text)


def test_cascade_policy_may_route_to_cascade():
    p = RoutingPolicy(weights={CASCADE: 1.0}, cascade=Cascade("mlp_0", 0.5))
    assert p.choose("any") == CASCADE
    # check_against needs the cascade's variants, not a model called "cascade"
    p.check_against({"mlp_0", "ensemble"})
    with pytest.raises(ConfigError, match="mlp_0"):
        p.check_against({"ensemble"})
