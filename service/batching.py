"""Adaptive batching: concurrent requests for the same model are coalesced into one call.

No timer: a request that finds its model idle runs at the next turn of the event loop (no added
latency at low load); the requests that arrive meanwhile, or while a call is running, wait for it
and then run together as the next call, up to `max_rows` rows. Small calls run on the event loop
(a thread hop costs more than the model); large ones in a worker thread. Each request was validated before it joined, so one bad request can never
fail the others (BentoML's batching fails the whole batch).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from starlette.concurrency import run_in_threadpool


@dataclass
class _Queue:
    pending: list = field(default_factory=list)  # [(X (b, F), future)]
    running: bool = False


class AdaptiveBatcher:
    def __init__(self, max_rows: int = 256, inline_rows: int = 32):
        self.max_rows, self.inline_rows = max_rows, inline_rows
        self.queues: dict[int, _Queue] = {}
        self.calls = 0
        self.requests = 0

    async def run(self, model: Callable[[np.ndarray], np.ndarray], X: np.ndarray) -> np.ndarray:
        """X (b, F) -> model output rows for X (b, C), computed in a shared call."""
        q = self.queues.setdefault(id(model), _Queue())
        fut = asyncio.get_running_loop().create_future()
        q.pending.append((X, fut))
        if not q.running:
            q.running = True
            asyncio.create_task(self._drain(q, model))
        return await fut

    async def _drain(self, q: _Queue, model) -> None:
        try:
            while q.pending:
                await asyncio.sleep(0)  # one loop turn: requests already received join this call
                batch, rows = [], 0
                while q.pending and (not batch or rows + len(q.pending[0][0]) <= self.max_rows):
                    X, fut = q.pending.pop(0)
                    batch.append((X, fut))
                    rows += len(X)
                self.calls += 1
                self.requests += len(batch)
                try:
                    Xb = batch[0][0] if len(batch) == 1 else np.concatenate([x for x, _ in batch])  # (rows, F)
                    out = model(Xb) if rows <= self.inline_rows else await run_in_threadpool(model, Xb)
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                start = 0
                for X, fut in batch:
                    if not fut.done():
                        fut.set_result(out[start : start + len(X)])
                    start += len(X)
        finally:
            q.running = False
