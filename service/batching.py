"""Adaptive batching: concurrent requests for the same model are coalesced into one call.

No timer: a request that finds its model idle runs at the next turn of the event loop (no added
latency at low load); the requests that arrive meanwhile, or while a call is running, wait for it
and then run together as the next call, up to `max_rows` rows. Up to `instances` calls of one
model run at once (Triton's model instances): while one computes in a worker thread, another can
start on the requests that arrived meanwhile, so a second core is not left idle. A model whose
intra-op threads FUSION_INTRA_OP_THREADS=auto chose runs at most cores // threads calls at once
(`instances_for`: a model on every core runs one call at a time, never oversubscribing them).

Cheap calls run on the event loop (a thread hop costs more than the model); expensive ones (more
than `inline_rows` rows, or expected to take longer than FUSION_INLINE_BUDGET_MS from the model's
recent calls: runtime.Model.inline_ok) run in a worker thread, so that the loop keeps reading
requests, which join the next call, while the model computes. Each request was validated before it
joined, so one bad request can never fail the others (BentoML's batching fails the whole batch); values
only the model can refuse (token ids past its vocabulary: InputError) fail the joined call, which is then
re-run one request at a time, so that only the request at fault gets the 400.

Named inputs (issue 15) join too: feeds of the same names concatenated along the batch when their other
dimensions agree, text feeds (ids, masks) re-padded on the right to the longest row of the call with their
pad values (`pads`, service/inputs.Inputs.pads; the graph masks the padding, so a row's answer is the same
in any call). A request that cannot join the call being gathered (another dynamic dimension) starts the next.

The per-model state lives as long as the model: a weak reference drops it when the model goes (a
hot swap lets go of the old version's models once their last request is done), so neither swaps
nor a recycled `id()` can leave a stale queue behind (issue 13, finding 13).
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import Histogram
from starlette.concurrency import run_in_threadpool

from fusion.errors import InputError
from service.inputs import can_join, join_feeds, n_rows
from service.metrics import Bounded
from service.runtime import INLINE_ROWS
from service.tuning import GAIN, batch_instances

BATCH_ROWS = Histogram(
    "fusion_batch_rows", "Rows per model call made by the adaptive batcher, by model", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_REQUESTS = Histogram(
    "fusion_batch_requests", "Requests coalesced into one model call by the adaptive batcher, by model", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_ROWS, BATCH_REQUESTS = Bounded(BATCH_ROWS), Bounded(BATCH_REQUESTS)  # model names are the bundle's; bounded anyway


@dataclass
class _Queue:
    pending: list = field(default_factory=list)  # [(X (b, F) or named feeds, future, pads)]
    running: int = 0  # drain tasks of this model (at most `instances`), each making one call at a time
    instances: int = 1  # AdaptiveBatcher.instances_for(the model)
    max_rows: int = 256  # AdaptiveBatcher.rows_for(the model)
    metrics: tuple = ()  # (rows, requests) Prometheus children of this model
    model: object = None  # a weak reference that drops this queue when the model goes (a strong one if it cannot be weak)


class AdaptiveBatcher:
    def __init__(self, max_rows: int = 256, inline_rows: int = INLINE_ROWS, instances: int = 1,
                 per_model_rows: bool = False):
        if max_rows < 1 or instances < 1:
            raise ValueError(f"expected max_rows >= 1 and instances >= 1; got {max_rows}, {instances}")
        self.max_rows, self.inline_rows, self.instances = max_rows, inline_rows, instances
        self.per_model_rows = per_model_rows  # FUSION_BATCH_MAX_ROWS=auto: each model's own size (rows_for)
        self.queues: dict[int, _Queue] = {}  # id(model) -> its queue, while the model lives
        self.calls = 0
        self.requests = 0
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def run(self, model: Callable[[np.ndarray], np.ndarray], X: np.ndarray, pads: dict | None = None) -> np.ndarray:
        """X (b, F), or named feeds {graph input: (b, ...)}, -> model output rows for X (b, C), computed in a
        shared call; `pads`: {text feed: its padding value} for named feeds (service/inputs.Inputs.pads)."""
        q = self.queues.get(id(model))
        if q is None:
            q = self.queues[id(model)] = self._queue(model)
        fut = asyncio.get_running_loop().create_future()
        q.pending.append((X, fut, pads or {}))
        if q.running < q.instances:  # an idle instance starts a call; busy ones pick it up next
            q.running += 1
            task = asyncio.create_task(self._drain(q, model))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    def instances_for(self, model) -> int:
        """Calls of `model` run at once: `instances`, but for a model whose threads auto chose no more than
        its cores hold (2 calls of 2 threads each on 2 cores only take turns, and slow each other); for one
        that FUSION_BATCH_MAX_ROWS=auto chose not to batch (`unbatched`), one call per core, unless load timing
        found those 1/GAIN slower per row than one call at a time on every core, then one (runtime.probe_parallel:
        32 requests at once on 2 cores thrash the caches and serve 0.75x as many). Near a tie, calls at once
        win when served: the text ensemble of issue 18 timed 27.7 ms a row at once and 26.7 one at a time,
        and served 39.0 requests/s two at a time against 30.3 one at a time (the HTTP layer needs a core too)."""
        if self.unbatched(model):  # one call per core, unless load timing found that clearly slower per row
            parallel, serial = model.parallel_s, model.batch_curve[1]
            return max(1, model.cores) if parallel is not None and parallel <= serial / GAIN else 1
        if getattr(model, "auto", None) is None:
            return self.instances
        return batch_instances(self.instances, model.threads, model.cores)

    def unbatched(self, model) -> bool:
        """Whether FUSION_BATCH_MAX_ROWS=auto timed `model` and chose no batching: its requests still queue
        here, one row-set per call, so that no more calls run at once than were timed (instances_for)."""
        choice = getattr(model, "batch_choice", None) if self.per_model_rows else None
        return choice is not None and choice[0] == 0 and getattr(model, "batch_curve", None) is not None

    def rows_for(self, model) -> int:
        """Rows per call for `model`: `max_rows`, or fewer when FUSION_BATCH_MAX_ROWS=auto chose its batch size
        from the sizes timed at load (runtime.Model.batch_choice: the size with the least time per row)."""
        if self.unbatched(model):
            return 1  # each request alone (a request of several rows still runs whole)
        choice = getattr(model, "batch_choice", None) if self.per_model_rows else None
        return min(self.max_rows, choice[0]) if choice is not None and choice[0] > 0 else self.max_rows

    def _queue(self, model) -> _Queue:
        label = getattr(model, "name", "model")
        q = _Queue(metrics=(BATCH_ROWS.labels(label), BATCH_REQUESTS.labels(label)), instances=self.instances_for(model),
                   max_rows=self.rows_for(model))
        key, queues = id(model), self.queues

        def forget(_ref) -> None:  # the model is gone: its id may be reused by the next one
            if queues.get(key) is q:
                queues.pop(key, None)

        try:
            q.model = weakref.ref(model, forget)
        except TypeError:  # not weak-referenceable (a builtin): keep it, so that its id cannot be reused
            q.model = model
        return q

    def _inline(self, model, rows: int) -> bool:
        inline_ok = getattr(model, "inline_ok", None)  # runtime.Model knows its cost; a plain callable is cheap
        return rows <= self.inline_rows and (inline_ok is None or inline_ok(rows))

    async def _each_alone(self, model, batch: list) -> None:
        """Each request of a call that failed on input values, in a call of its own: its answer or its error."""
        for X, fut, _ in batch:
            try:
                out = model(X) if self._inline(model, _rows(X)) else await run_in_threadpool(model, X)
            except Exception as exc:  # noqa: BLE001 - this request's own error
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(out)

    async def _drain(self, q: _Queue, model) -> None:
        batch: list = []
        try:
            while q.pending:
                await asyncio.sleep(0)  # one loop turn: requests already received join this call
                if not q.pending:  # another instance took them during that turn
                    break
                batch, rows = [], 0
                while q.pending and (not batch or (rows + _rows(q.pending[0][0]) <= q.max_rows
                                                   and can_join(batch[0][0], q.pending[0][0], batch[0][2]))):
                    X, fut, pads = q.pending.pop(0)
                    batch.append((X, fut, pads))
                    rows += _rows(X)
                self.calls += 1
                self.requests += len(batch)
                q.metrics[0].observe(rows)
                q.metrics[1].observe(len(batch))
                try:
                    Xb = (batch[0][0] if len(batch) == 1 else join_feeds([x for x, _, _ in batch], batch[0][2])
                          if type(batch[0][0]) is dict else np.concatenate([x for x, _, _ in batch]))  # (rows, ...)
                    out = model(Xb) if self._inline(model, rows) else await run_in_threadpool(model, Xb)
                except InputError as exc:
                    if len(batch) == 1:
                        if not batch[0][1].done():
                            batch[0][1].set_exception(exc)
                    else:  # one request's values were refused (ids past the vocabulary) and the joined call with
                        await self._each_alone(model, batch)  # them: each runs alone, only the culprit gets the 400
                    batch = []
                    continue
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    for _, fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    batch = []
                    continue
                start = 0
                for X, fut, _ in batch:
                    if not fut.done():
                        fut.set_result(out[start : start + _rows(X)])
                    start += _rows(X)
                batch = []
        except asyncio.CancelledError:  # the loop is shutting down: nobody may wait forever
            for _, fut, _ in batch:
                if not fut.done():
                    fut.cancel()
            raise
        finally:
            q.running -= 1


def _rows(X) -> int:
    return n_rows(X) if type(X) is dict else len(X)
