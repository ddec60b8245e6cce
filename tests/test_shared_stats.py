"""One statistics module for both halves (issue 14): the service's A/B report and the offline comparison
report call the same functions from fusion/stats.py, which imports neither torch nor scipy."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import binomtest

import fusion.compare as compare
import fusion.stats as shared
import service.ab as service_stats


@pytest.mark.parametrize("name", ["wilson_interval", "mcnemar_exact"])
def test_both_halves_call_the_same_function_objects(name):
    assert getattr(service_stats, name) is getattr(shared, name), f"service/ab.py has its own {name}"
    assert getattr(compare, name) is getattr(shared, name), f"fusion/compare.py has its own {name}"


def test_two_proportion_test_is_the_shared_one():
    assert service_stats.two_proportion_test is shared.two_proportion_test


def test_no_second_implementation_in_either_half():
    """The halves import the functions; neither module defines a function of these names itself."""
    for mod in (service_stats, compare):
        for name in ("wilson_interval", "mcnemar_exact", "two_proportion_test"):
            f = getattr(mod, name, None)
            assert f is None or f.__module__ == "fusion.stats", f"{mod.__name__}.{name} is defined in {f.__module__}"


def test_the_shared_module_imports_without_torch_or_scipy():
    code = ("import sys, json; import fusion.stats; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'scipy', 'sklearn'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == [], f"importing fusion.stats pulled in {out.stdout.strip()}"


def test_wilson_interval_at_zero_trials_is_uninformative_in_both_halves():
    """The one behaviour at n = 0: (0, 1), no exception (the offline report used to raise)."""
    assert compare.wilson_interval(0, 0) == service_stats.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k,n", [(-1, 10), (11, 10), (0, -1), (1, 0)])
def test_wilson_interval_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match="expected 0 <= k <= n"):
        shared.wilson_interval(k, n)


def test_offline_mcnemar_pairs_match_scipy_binomtest():
    """fusion/compare.py's p-values, now from the shared O(1) test, equal scipy's binomtest (what it used) to 1e-9."""
    rng = np.random.default_rng(0)
    for n, p_model, p_ref in [(20, 0.5, 0.5), (200, 0.7, 0.8), (2000, 0.9, 0.88), (5000, 0.6, 0.9), (30, 0.1, 0.95)]:
        model, ref = rng.random(n) < p_model, rng.random(n) < p_ref
        res = compare.mcnemar_pairs(model, ref)
        b, c = int((model & ~ref).sum()), int((~model & ref).sum())
        assert (res["b"], res["c"]) == (b, c)
        want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
        assert res["p_value"] == pytest.approx(want, rel=1e-9, abs=1e-300), (n, b, c)
