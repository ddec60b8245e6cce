"""Shadow runs: a variant run on a request's rows off the response path, its answers compared with
the primary's (service/ab.py). One worker thread and a bounded queue: when it is full the run is
dropped and counted (fusion_shadow_failures, reason queue_full), never queued without bound."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from typing import Callable

from service.ab import Stats

log = logging.getLogger("fusion.service")


class ShadowRunner:
    def __init__(self, stats: Stats, limit: int):
        self.stats = stats
        self.limit = limit  # runs waiting or running beyond this are dropped
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, shadow: str, primary: str, labels: list, rid: str, run: Callable[[], list],
               version: str | None = None) -> bool:
        """Run `run()` (the shadow's labels for the request's rows) in the shadow thread and record the
        comparison with the primary's `labels` (on bundle `version`); False when the queue was full (the
        drop is counted)."""
        with self._lock:
            if self._pending >= self.limit:
                self.stats.shadow_failed(shadow, "queue_full")
                return False
            self._pending += 1

        def job():
            try:
                t0 = time.perf_counter()
                shadow_labels = run()
                self.stats.observe_shadow(rid, primary, shadow, labels, shadow_labels, time.perf_counter() - t0,
                                          version=version)
            except Exception as exc:  # noqa: BLE001 - a failing shadow never reaches the client
                log.warning("shadow %s failed for request %s: %s", shadow, rid, exc)
                self.stats.shadow_failed(shadow, type(exc).__name__)
            finally:
                with self._lock:
                    self._pending -= 1

        self._pool.submit(job)
        return True

    def close(self, wait: bool = True) -> None:
        """Stop taking runs; with `wait`, after the queued ones finish (tests use it to read the stats)."""
        self._pool.shutdown(wait=wait)
