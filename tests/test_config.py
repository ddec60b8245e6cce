"""service/config.py: every setting read once, validated with errors that name the variable, passed down.

Independent checks: the names config reads are compared with the FUSION_* names the documentation
mentions (grepped from README.md, docs/ and deploy/); no other module under service/ reads the
environment (grepped); importing service.app leaves BentoML's classes as installed (a fresh interpreter).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.errors import ConfigError
from service import config, patches
from service.auth import Tokens
from service.config import EngineConfig, ServeSettings, Settings
from service.preflight import default_memory_mb
from service.routing import Cascade, RoutingPolicy
from service.runtime import RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]
FUSION_NAME = re.compile(r"\bFUSION_[A-Z0-9_]*[A-Z0-9]\b")
# documented variables that are not the service's settings: who reads each (checked below)
NOT_SERVICE = {"FUSION_FAULT": "tests/hooks/member_faults.py", "FUSION_UI_BUNDLE": "tests/test_ui.py",
               "FUSION_UPDATE_SCREENSHOT": "tests/test_ui.py"}


def documented_names() -> set[str]:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "deploy").rglob("*.md")]
    return {m for f in files for m in FUSION_NAME.findall(f.read_text(encoding="utf-8"))}


def test_defaults_are_the_dataclasses_defaults():
    cfg = config.load({})
    # the one difference: a server's A/B store is SQLite (`sqlite:`, in the state directory) unless
    # FUSION_AB_STORE says otherwise; an EngineConfig built in-process keeps per-process figures ("memory")
    assert cfg.http == Settings() and cfg.engine == EngineConfig(ab_store="sqlite:") and cfg.runtime == RuntimeConfig()
    assert cfg.tokens == Tokens() and cfg.routing == RoutingPolicy() and cfg.serve == ServeSettings()
    assert (cfg.load_limits.timeout_s, cfg.load_limits.max_memory_mb) == (20.0, default_memory_mb())
    assert cfg.runtime.run_timeout_s == cfg.http.timeout_s == 30.0 and cfg.runtime.inline_budget_s == 0.5e-3
    assert cfg.routing.weights == {"ensemble": 1.0} and cfg.http.log_level == "INFO"


def test_every_variable_reaches_its_setting():
    env = {
        "FUSION_MAX_ROWS": "7", "FUSION_MAX_BODY_BYTES": "1000", "FUSION_MAX_SMALL_BODY_BYTES": "99",
        "FUSION_BODY_TIMEOUT_S": "1.5", "FUSION_WORKERS": "3", "FUSION_TIMEOUT_S": "9", "FUSION_MAX_CONCURRENCY": "0",
        "FUSION_TRACING": "yes", "FUSION_ACCESS_LOG": "off", "FUSION_LOG_LEVEL": "debug", "FUSION_DRAIN_S": "2",
        "FUSION_DRAIN_MAX_S": "4", "FUSION_MAX_IMAGE_PIXELS": "1000", "FUSION_MAX_TEXT_CHARS": "50", "FUSION_BUNDLE": "b/v2", "FUSION_FAILURE_POLICY": "quorum:2",
        "FUSION_MEMBER_DEADLINE_MS": "250", "FUSION_SHADOW_QUEUE": "8", "FUSION_BATCH_MAX_ROWS": "64",
        "FUSION_BATCH_INSTANCES": "3", "FUSION_BUNDLE_ROOT": "/srv/b", "FUSION_INTRA_OP_THREADS": "4",
        "FUSION_AB_STORE": "postgresql://db/ab", "FUSION_STATE_DIR": "/var/lib/fusion", "FUSION_AB_RETENTION_DAYS": "7",
        "FUSION_AB_QUEUE": "99", "FUSION_AB_FEEDBACK_WAIT_MS": "250", "FUSION_AB_SPOOL_MAX_MB": "8",
        "FUSION_MEMBER_THREADS": "2", "FUSION_DEVICE": "CPU", "FUSION_GPU_IDS": "0, 2", "FUSION_MAX_MANIFEST_BYTES": "5000",
        "FUSION_INLINE_BUDGET_MS": "0", "FUSION_LOAD_TIMEOUT_S": "11", "FUSION_LOAD_MAX_MEMORY_MB": "0",
        "FUSION_INFERENCE_TOKEN": "i", "FUSION_ADMIN_TOKEN": "a", "FUSION_ADMIN_LOOPBACK": "0",
        "FUSION_ALLOWED_HOSTS": "h.example", "FUSION_ALLOWED_ORIGINS": "https://o.example/",
        "FUSION_AB_WEIGHTS": "ensemble=1,mlp_0=1", "FUSION_SHADOW": "members", "FUSION_CASCADE": "mlp_0:0.9",
        "BENTOML_HOST": "10.0.0.1", "BENTOML_PORT": "4000", "PROMETHEUS_MULTIPROC_DIR": "/tmp/m", "OTHER": "x",
    }
    cfg = config.load(env)
    assert cfg.http == Settings(7, 1000, 99, 1.5, 3, 9.0, 0, True, False, "DEBUG", 2.0, 4.0, 1000, 50)
    assert cfg.engine == EngineConfig("b/v2", "quorum:2", 250.0, 8, 64, 3, "/srv/b", "postgresql://db/ab", "/var/lib/fusion",
                                      7.0, 99, 250.0, 8.0)
    # run timeout follows FUSION_TIMEOUT_S; an explicit FUSION_BATCH_MAX_ROWS times no batch sizes at load
    assert cfg.runtime == RuntimeConfig(4, 2, "cpu", (0, 2), 5000, 9.0, 0.0, processes=3, batch_curve=False)
    assert (cfg.load_limits.timeout_s, cfg.load_limits.max_memory_mb) == (11.0, 0)
    # the bundle check's child gets the service's environment, less the metrics directory
    assert dict(cfg.load_limits.child_env) == {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    assert cfg.tokens == Tokens("i", "a", False, frozenset({"h.example"}), frozenset({"https://o.example"}))
    assert cfg.routing == RoutingPolicy({"ensemble": 0.5, "mlp_0": 0.5}, ("members",), Cascade("mlp_0", 0.9, "ensemble"))
    assert cfg.serve == ServeSettings("10.0.0.1", 4000)


def test_documented_variables_are_the_ones_config_reads():
    _, read = config.read({})
    read = {n for n in read if n.startswith("FUSION_")}
    documented = documented_names()
    for name, reader in NOT_SERVICE.items():  # each exclusion is real: read there, and never by the service
        assert name in (ROOT / reader).read_text(), (name, reader)
    in_service = {f"{p.relative_to(ROOT)}: {n}" for p in (ROOT / "service").rglob("*.py")
                  for n in set(FUSION_NAME.findall(p.read_text())) & set(NOT_SERVICE)}
    assert in_service == set(), "a test-only variable is mentioned in service/"
    assert documented - set(NOT_SERVICE) - read == set(), "documented but never read by service/config.py"
    assert read - documented == set(), "read by service/config.py but documented nowhere"
    assert len(read) >= 35


@pytest.mark.parametrize("name, value, expected", [
    ("FUSION_MAX_ROWS", "abc", "expected a positive integer; got 'abc'"),
    ("FUSION_MAX_ROWS", "0", "expected a positive integer; got '0'"),
    ("FUSION_WORKERS", "1.5", "expected a positive integer"),
    ("FUSION_TIMEOUT_S", "-1", "expected a positive number of seconds; got '-1'"),
    ("FUSION_BODY_TIMEOUT_S", "nan", "expected a positive number of seconds; got 'nan'"),
    ("FUSION_DRAIN_MAX_S", "inf", "non-negative number of seconds"),
    ("FUSION_MAX_CONCURRENCY", "-3", "non-negative integer"),
    ("FUSION_TRACING", "maybe", "expected 1 or 0"),
    ("FUSION_ACCESS_LOG", "2", "expected 1 or 0"),
    ("FUSION_LOG_LEVEL", "loud", "expected one of DEBUG"),
    ("FUSION_FAILURE_POLICY", "quorum:0", "expected 'strict' or 'quorum:k'"),
    ("FUSION_MEMBER_DEADLINE_MS", "0", "positive number of milliseconds"),
    ("FUSION_BATCH_INSTANCES", "0", "positive integer"),
    ("FUSION_DEVICE", "tpu", "expected one of auto, cpu, cuda; got 'tpu'"),
    ("FUSION_GPU_IDS", "0,a", "GPU indices"),
    ("FUSION_INLINE_BUDGET_MS", "-0.1", "non-negative number of milliseconds"),
    ("FUSION_RUN_TIMEOUT_S", "soon", "number of seconds"),
    ("FUSION_LOAD_TIMEOUT_S", "0", "positive number of seconds"),
    ("FUSION_LOAD_MAX_MEMORY_MB", "lots", "non-negative integer of MB"),
    ("FUSION_ADMIN_LOOPBACK", "maybe", "expected 1 or 0"),
    ("FUSION_AB_WEIGHTS", "ensemble=x", "FUSION_AB_WEIGHTS"),
    ("FUSION_CASCADE", "mlp_0:2", "FUSION_CASCADE"),
    ("FUSION_AB_STORE", "mysql://db", "expected 'sqlite:///path/ab.db'"),
    ("FUSION_AB_RETENTION_DAYS", "-1", "non-negative number of days"),
    ("FUSION_AB_QUEUE", "0", "positive integer"),
    ("FUSION_AB_FEEDBACK_WAIT_MS", "x", "non-negative number of milliseconds"),
    ("BENTOML_PORT", "99999", "TCP port"),
])
def test_a_bad_value_names_the_variable_and_what_was_expected(name, value, expected):
    with pytest.raises(ConfigError) as err:
        config.load({name: value})
    text = str(err.value)
    assert text.startswith(f"{name}: ") and expected in text and "got" in text, text


def test_no_module_under_service_but_config_reads_the_environment():
    reads = re.compile(r"os\.environ|os\.getenv|\bgetenv\(|from os import[^\n]*\b(environ|getenv)\b")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "service").rglob("*.py")) if p.name != "config.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if reads.search(line)]
    assert offenders == []
    assert reads.search((ROOT / "service" / "config.py").read_text())  # the check itself finds a read


def test_models_take_the_inline_budget_they_were_loaded_with(tiny_bundle):
    from service import runtime

    cheap = runtime.load(tiny_bundle, RuntimeConfig(device="cpu", inline_budget_s=10.0))
    never = runtime.load(tiny_bundle, RuntimeConfig(device="cpu", inline_budget_s=0.0))
    for name in cheap.models:  # warm-up made small calls, so every model has a cost above 0
        assert cheap.models[name].inline_ok(1) and not never.models[name].inline_ok(1), name
        assert never.models[name].inline_ok(1, budget_s=10.0)  # an explicit budget still wins


@pytest.mark.parametrize("found", ["1.5.0", "1.4.38", "2.0.0", "1.3.9", "not-a-version"])
def test_the_bentoml_version_check_refuses_an_unexpected_version(found):
    with pytest.raises(ConfigError) as err:
        patches.check_bentoml_version(found)
    low, high = patches.BENTOML_RANGE
    assert f"BentoML {found} is installed" in str(err.value) and f">= {low}, < {high}" in str(err.value)


def test_the_installed_bentoml_is_in_the_range_and_the_floor_matches_pyproject():
    import bentoml

    assert patches.check_bentoml_version() == bentoml.__version__
    floor, ceiling = re.search(r'"bentoml>=([0-9.]+),<([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).groups()
    assert (floor, ceiling) == tuple(patches.BENTOML_RANGE)  # pip never installs a BentoML the patches refuse


PROBE = """
import bentoml._internal.server.http.traffic as t, bentoml._internal.server.http.instruments as i
before = (t.TimeoutMiddleware.__call__, i.HTTPTrafficMetricsMiddleware.__call__, i.RunnerTrafficMetricsMiddleware.__call__)
import service.app as app
after = (t.TimeoutMiddleware.__call__, i.HTTPTrafficMetricsMiddleware.__call__, i.RunnerTrafficMetricsMiddleware.__call__)
assert after == before, "importing service.app patched BentoML"
from service import config, patches
svc = app.FusionService.inner(config.load({"FUSION_BUNDLE": "/nonexistent/bundle", "FUSION_DEVICE": "cpu"}))
assert not svc.engine.ready  # no such bundle: up and not ready, and BentoML is patched all the same
patched = (t.TimeoutMiddleware.__call__, i.HTTPTrafficMetricsMiddleware.__call__, i.RunnerTrafficMetricsMiddleware.__call__)
assert all(a is not b for a, b in zip(patched, before)), "the patches did not apply"
patches.apply(app.endpoint_labels())  # idempotent
assert (t.TimeoutMiddleware.__call__, i.HTTPTrafficMetricsMiddleware.__call__, i.RunnerTrafficMetricsMiddleware.__call__) == patched
print("ok")
"""


def test_importing_the_app_patches_nothing_and_the_construction_does():
    env = {"BENTOML_DO_NOT_TRACK": "true", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "ok", out.stderr[-3000:]


def test_cuda_provider_turns_tf32_off(monkeypatch):
    """onnxruntime's CUDA provider multiplies in TF32 unless told not to; on an H200 that moved the
    ensemble's probabilities by 2e-3 from the CPU's. The service asks for float32."""
    from service import runtime

    monkeypatch.setattr(runtime.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    cfg = runtime.RuntimeConfig(device="cuda", gpu_ids=(0,))
    providers = runtime.providers_for(cfg, 1)
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": "0"})
    assert providers[-1] == "CPUExecutionProvider"
    assert runtime.providers_for(runtime.RuntimeConfig(device="cpu"), 1) == ["CPUExecutionProvider"]
    opted_in = runtime.RuntimeConfig(device="cuda", gpu_ids=(0,), cuda_tf32=True)
    assert runtime.providers_for(opted_in, 0)[0] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": "1"})
    from service import config
    assert config.load({"FUSION_CUDA_TF32": "1"}).runtime.cuda_tf32 is True
    assert config.load({}).runtime.cuda_tf32 is False


@pytest.mark.parametrize("name,value", [
    ("FUSION_MEMBER_DEADLINE_MS", "1e13"),   # threading's TIMEOUT_MAX: every members-mode request was a 500
    ("FUSION_LOAD_TIMEOUT_S", "5e9"),        # subprocess timeout overflow: every bundle refused as "malformed"
    ("FUSION_LOAD_MAX_MEMORY_MB", "99999999999999999999"),  # setrlimit overflow in the load check
    ("FUSION_WORKERS", "100000"),
    ("FUSION_MAX_ROWS", "1e22"),
    ("FUSION_TIMEOUT_S", "1e300"),
    ("FUSION_RUN_TIMEOUT_S", "1e12"),
    ("BENTOML_PORT", "70000"),
])
def test_values_past_what_the_runtime_can_take_are_refused_at_start(name, value):
    """Review of issue 14: these were accepted, then failed at the first request or bundle load."""
    with pytest.raises(ConfigError, match=name) as err:
        config.load({name: value})
    assert "at most" in str(err.value) or "expected" in str(err.value)
