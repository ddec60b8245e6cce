"""timm sources never reach the network or read files outside the recipe (review s2).

`timm.create_model` treats `hf-hub:ORG/NAME` and `local-dir:PATH` as pretrained-config sources even with
pretrained=False: the first fetches config.json from huggingface.co, the second reads any config.json. A
recipe may name only a model from timm.list_models(); a socket guard fails the test on any network attempt.
"""
from __future__ import annotations

import socket

import pytest

timm = pytest.importorskip("timm", reason="the [vision] extra: pip install -e '.[vision]'")

from fusion import sources  # noqa: E402
from fusion.errors import ConfigError  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise AssertionError(f"network attempt during a timm source: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    yield attempts
    assert attempts == [], f"expected no network attempts; got {attempts}"


@pytest.mark.parametrize("ref", ["hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/nonexistent-config-dir",
                                 "timm/resnet18.a1_in1k", "resnet18:x"])
def test_hub_and_local_dir_names_are_refused_without_network(no_network, ref):
    with pytest.raises(ConfigError) as err:
        sources.resolve(f"timm:{ref}", {})
    msg = str(err.value)
    assert "timm.list_models()" in msg and repr(ref) in msg


def test_unknown_name_lists_close_matches(no_network):
    with pytest.raises(ConfigError) as err:
        sources.resolve("timm:resnet181", {})
    msg = str(err.value)
    assert "'resnet181'" in msg and "resnet18" in msg and "timm.list_models()" in msg


def test_listed_name_still_builds(no_network):
    model = sources.resolve("timm:resnet10t", {"num_classes": 3})
    assert type(model).__module__.startswith("timm.") and model.num_classes == 3
