"""Issue 13, finding 13: two small leaks.

(a) The adaptive batcher kept a queue (and its metric children) for every model it had ever seen:
    after each hot swap, the swapped-out bundle's models stayed in `AdaptiveBatcher.queues` for the
    life of the worker. Its state must live exactly as long as the model: released once the old
    version is let go of, kept while a call on it is still running.
(b) `/docs.json` told anonymous clients which bearer tokens the server has set (the `security` of each
    operation and its 401/403 responses depended on them). An anonymous client must get the same
    document whatever tokens are set.
"""

from __future__ import annotations

import asyncio
import gc
import threading

import httpx
import numpy as np
import pytest

from service.batching import AdaptiveBatcher
from tests.reliability.conftest import MAX_BODY, MAX_CONCURRENCY, MAX_ROWS
from tests.reliability.harness import env_threads, record
from tests.server import Server

NAMES = ("ensemble", "mlp_0", "mlp_1", "mlp_2")


class Fake:
    """A bundle's model: a name and a deterministic output (each row times `scale`)."""

    def __init__(self, name: str, scale: float, block: threading.Event | None = None):
        self.name, self.scale, self.block = name, scale, block

    def inline_ok(self, rows: int) -> bool:
        return self.block is None  # a blocking one runs in a worker thread, as an expensive model would

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if self.block is not None:
            assert self.block.wait(10), "the test never released the model"
        return X * self.scale


def bundle(version: int, block: threading.Event | None = None) -> dict[str, Fake]:
    return {n: Fake(n, version + i, block) for i, n in enumerate(NAMES)}


def test_sec13_batcher_holds_state_only_for_the_current_models():
    batcher = AdaptiveBatcher(64, instances=2)
    n_swaps = 25

    async def main() -> dict[str, Fake]:
        models = bundle(0)
        for version in range(1, n_swaps + 1):
            models = bundle(version)  # hot swap: the old version's models are let go of
            X = np.arange(6, dtype=np.float32).reshape(3, 2)
            outs = await asyncio.gather(*(batcher.run(models[n], X + i) for i, n in enumerate(NAMES) for _ in range(3)))
            expected = [(X + i) * (version + i) for i, n in enumerate(NAMES) for _ in range(3)]
            for got, want in zip(outs, expected):
                np.testing.assert_array_equal(got, want)
        return models

    current = asyncio.run(main())
    gc.collect()
    held = set(batcher.queues)
    record("sec13a_batcher_prune", swaps=n_swaps, models_per_bundle=len(NAMES), queues_held=len(held))
    assert held == {id(m) for m in current.values()}, (
        f"expected the batcher to hold state for the {len(NAMES)} current models only after {n_swaps} swaps; "
        f"got {len(held)} queues")


def test_sec13_batcher_keeps_a_swapped_out_model_until_its_calls_end():
    batcher = AdaptiveBatcher(64, instances=1)
    release = threading.Event()

    async def main():
        old = bundle(1, block=release)
        X = np.ones((2, 2), dtype=np.float32)
        pending = [asyncio.ensure_future(batcher.run(old["mlp_0"], X)) for _ in range(3)]  # 1 call running + 2 queued
        await asyncio.sleep(0.05)
        old_id = id(old["mlp_0"])
        del old  # the swap: only the requests in flight (and the batcher's running call) hold the model
        gc.collect()
        assert old_id in batcher.queues, "expected the queue kept while a call on the model is running"
        release.set()
        outs = await asyncio.gather(*pending)
        for out in outs:
            np.testing.assert_array_equal(out, X * 2)  # the first model of version 1: scale 1 + 1
        new = bundle(2)
        np.testing.assert_array_equal(await batcher.run(new["mlp_0"], X), X * 3)
        return new, old_id

    new, old_id = asyncio.run(main())
    gc.collect()
    assert set(batcher.queues) == {id(new["mlp_0"])}, f"expected only the current model's queue; got {len(batcher.queues)}"


# ---- (b) /docs.json ----------------------------------------------------------------------------------


@pytest.mark.server
def test_sec13_docs_json_does_not_tell_which_tokens_are_set(main_server, v1, bundle_root):
    """The shared server has both tokens; a second one (same bundle and limits) has none."""
    env = {**env_threads(), "FUSION_BUNDLE_ROOT": str(bundle_root), "FUSION_MAX_BODY_BYTES": str(MAX_BODY),
           "FUSION_MAX_ROWS": str(MAX_ROWS), "FUSION_MAX_CONCURRENCY": str(MAX_CONCURRENCY)}
    with Server(v1, env=env) as open_server:
        no_tokens = httpx.get(open_server.url + "/docs.json", timeout=10)
    with_tokens = httpx.get(main_server.url + "/docs.json", timeout=10)
    assert no_tokens.status_code == with_tokens.status_code == 200
    a, b = no_tokens.json(), with_tokens.json()
    differ = sorted(p for p in set(a["paths"]) | set(b["paths"]) if a["paths"].get(p) != b["paths"].get(p))
    record("sec13b_docs_json", paths=len(b["paths"]), differing_paths=differ, identical=a == b)
    assert not differ, f"expected the same operations whatever tokens are set; these differ: {differ}"
    assert a == b, "expected the same /docs.json whatever tokens are set"
    # and it still says how to authenticate: every non-health operation may need the bearer token
    predict = b["paths"]["/predict"]["post"]
    assert {"bearer": []} in predict["security"] and "401" in predict["responses"], predict["security"]
    admin = b["paths"]["/admin/bundle"]["post"]
    assert {"bearer": []} in admin["security"] and {"401", "403"} <= set(admin["responses"]), admin["responses"].keys()
    assert b["paths"]["/v2/health/ready"]["get"]["security"] == []
