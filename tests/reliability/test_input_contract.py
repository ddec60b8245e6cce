"""Issue 13, findings 3, 7, 10 and 11, and issue 21 item 8, in-process (no server): the parsing and
admission code itself, where a property can be checked exactly rather than through timings.

3.  Admission (service/traffic.py): a request takes an inference slot only once its body is complete;
    a body that does not complete within the body deadline is a `RequestTimeoutError` (408).
7.  One parse per body (orjson only: NaN/Infinity/overflow are named from its error, never re-parsed
    with the stdlib); large bodies are parsed in a worker thread.
10. Every malformed string, header or OIP field is an `InputError` (a 400), never another exception
    (a 500): lone surrogates, non-ASCII digits, over-long numbers, wrongly typed OIP fields. A
    hypothesis run throws arbitrary JSON documents (surrogates included) at both parsers.
11. Booleans among OIP `data` numbers are refused, as /predict refuses them.
21.8 Error messages print plain values, never numpy reprs (`np.float64(nan)`).
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.errors import InputError
from service import oip, payload

N = 8  # features per row in these unit tests
MAX_ROWS = 16
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def row(*cells: str) -> str:
    """One row of N numbers as JSON text, the first cells replaced by `cells` (raw JSON tokens)."""
    return "[" + ",".join(list(cells) + ["1.0"] * (N - len(cells))) + "]"


# ---- finding 3: admission after the body -----------------------------------------------------


def _body_app(hold: asyncio.Event | None = None):
    """An ASGI app that reads its body as our handlers do (Request.stream) and maps errors as they do."""
    from starlette.requests import Request

    from service.errors import status_for

    async def app(scope, receive, send):
        try:
            body = b"".join([chunk async for chunk in Request(scope, receive).stream()])
            if hold is not None:
                await hold.wait()
            status, out = 200, body
        except Exception as exc:  # noqa: BLE001 - as service.app.endpoint
            status, out = status_for(exc), str(exc).encode()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": out})

    return app


async def _call(app, chunks: list[bytes], *, complete: bool = True, method: str = "POST") -> tuple[int, bytes]:
    """Send a request whose body arrives as `chunks`; with complete=False the last chunk never comes."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, c in enumerate(chunks):
        queue.put_nowait({"type": "http.request", "body": c, "more_body": not complete or i < len(chunks) - 1})
    sent = []

    async def receive():
        return await queue.get()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/predict",
             "headers": [(b"content-length", str(sum(map(len, chunks)) + (0 if complete else 100)).encode())]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_03_a_request_takes_its_slot_only_once_its_body_is_complete():
    from service.traffic import Admission, Traffic

    async def main():
        traffic = Traffic(limit=1, body_timeout_s=0.5)
        app = Admission(_body_app(), traffic)
        slow = asyncio.create_task(_call(app, [b'{"in'], complete=False))
        await asyncio.sleep(0.05)
        during = (traffic.inflight, traffic.admitted)
        fast = await _call(app, [b"{}"])
        slow_answer = await slow
        return during, fast, slow_answer, (traffic.inflight, traffic.admitted)

    during, fast, (slow_status, slow_msg), after = asyncio.run(main())
    assert during == (1, 0), f"a request still sending its body holds a slot: (in flight, admitted) = {during}"
    assert fast == (200, b"{}"), fast
    assert slow_status == 408 and b"FUSION_BODY_TIMEOUT_S" in slow_msg, (slow_status, slow_msg)
    assert after == (0, 0)


def test_03_complete_bodies_still_meet_the_limit():
    from service.traffic import Admission, Traffic

    async def main():
        traffic = Traffic(limit=1, body_timeout_s=5)
        hold = asyncio.Event()
        app = Admission(_body_app(hold), traffic)
        first = asyncio.create_task(_call(app, [b"{", b"}"]))
        await asyncio.sleep(0.05)
        admitted = traffic.admitted
        second = await _call(app, [b"{}"])
        no_body = await _call(app, [], method="GET")
        hold.set()
        return admitted, second, no_body, await first, traffic.refused

    admitted, second, no_body, first, refused = asyncio.run(main())
    assert admitted == 1
    assert second[0] == 429 and b"limit 1" in second[1], second
    assert no_body[0] == 429, no_body  # a request without a body is admitted (or refused) at once
    assert first == (200, b"{}") and refused == 2


def test_03_a_client_that_does_not_read_its_answer_holds_no_slot():
    """The same hole by another path: a client whose socket never drains stalls the server's `send`
    (uvicorn waits on flow control). Its slot is given back when the response starts, so clients
    that never read cannot crowd out the others (before: the slot was held until the send ended)."""
    from service.traffic import Admission, Traffic

    async def main():
        traffic = Traffic(limit=2, body_timeout_s=5)
        app = Admission(_body_app(), traffic)
        stuck = asyncio.Event()  # never set: the stalled clients' sockets never drain

        async def never_reads(message):
            if message["type"] == "http.response.body":
                await stuck.wait()

        async def call_stalled(method):
            queue: asyncio.Queue = asyncio.Queue()
            queue.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
            scope = {"type": "http", "method": method, "path": "/predict", "headers": []}
            await app(scope, queue.get, never_reads)

        stalled = [asyncio.create_task(call_stalled(m)) for m in ("POST", "POST", "GET", "GET")]
        await asyncio.sleep(0.05)
        during = (traffic.inflight, traffic.admitted)
        fresh = await _call(app, [b"{}"])
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
        return during, fresh, (traffic.inflight, traffic.admitted)

    during, fresh, after = asyncio.run(main())
    assert during == (4, 0), f"clients stalled on their answers hold slots: (in flight, admitted) = {during}"
    assert fresh == (200, b"{}"), fresh
    assert after == (0, 0), after


def test_03_the_body_deadline_is_total_not_per_chunk():
    """A body that keeps trickling (a byte every 0.1 s) is still cut at the deadline."""
    from service.traffic import Admission, Traffic

    async def main():
        traffic = Traffic(limit=4, body_timeout_s=0.4)
        app = Admission(_body_app(), traffic)
        queue: asyncio.Queue = asyncio.Queue()

        async def drip():
            for _ in range(50):
                queue.put_nowait({"type": "http.request", "body": b" ", "more_body": True})
                await asyncio.sleep(0.1)

        dripper = asyncio.create_task(drip())
        sent = []

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-length", b"1000")]}
        t0 = asyncio.get_running_loop().time()
        await app(scope, queue.get, send)
        took = asyncio.get_running_loop().time() - t0
        dripper.cancel()
        return sent[0]["status"], took

    status, took = asyncio.run(main())
    assert status == 408 and 0.35 <= took < 3.0, (status, took)


# ---- finding 7: one parser, one parse --------------------------------------------------------


@pytest.mark.parametrize("token, said", [
    ("NaN", "got NaN"), ("Infinity", "got Infinity"), ("-Infinity", "got -Infinity"),
    ("1e999", "beyond float64 range"), ("-1e400", "beyond float64 range"), ("1" + "0" * 400, "beyond float64 range"),
])
def test_07_non_finite_tokens_are_named_from_a_single_orjson_parse(monkeypatch, token, said):
    calls = {"orjson": 0, "stdlib": 0}
    real = orjson.loads

    def counting_orjson(b):
        calls["orjson"] += 1
        return real(b)

    def no_stdlib(*a, **k):
        calls["stdlib"] += 1
        raise AssertionError("the stdlib parser was called: the body was parsed twice")

    monkeypatch.setattr(payload.orjson, "loads", counting_orjson)
    monkeypatch.setattr(json, "loads", no_stdlib)  # the stdlib parser, wherever it is called from
    body = ('{"inputs": [' + ",".join([row()] * 200 + [row("1.0", token)]) + "]}").encode()
    with pytest.raises(InputError) as exc:
        payload.parse_json(body)
    msg = str(exc.value)
    assert calls == {"orjson": 1, "stdlib": 0}, calls
    assert said in msg and "expected a finite number" in msg and "line 1, column" in msg, msg
    column = int(msg.rsplit("column ", 1)[1].split()[0].rstrip(")"))
    assert body.decode()[column - 1:].lstrip("-").startswith(token.lstrip("-")[:3]), (msg, body.decode()[column - 5:column + 5])


def test_07_bodies_with_more_values_than_the_batch_limit_are_refused_before_parsing(monkeypatch):
    from fusion.errors import PayloadTooLargeError

    parsed = []
    real = orjson.loads
    monkeypatch.setattr(payload.orjson, "loads", lambda b: parsed.append(len(b)) or real(b))
    zeros = b",".join([b"0"] * 1_000_000)
    bodies = {
        "predict": lambda: payload.parse_predict(b'{"inputs": [[' + zeros + b"]]}", N, MAX_ROWS),
        "oip": lambda: oip.parse(b'{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [' + zeros + b"]}]}",
                                 None, N, MAX_ROWS),
    }
    for name, call in bodies.items():
        with pytest.raises(PayloadTooLargeError, match="refused before parsing"):
            call()
    assert parsed == [], f"orjson parsed {parsed} bytes of bodies that were over the value limit"
    # the largest batch the limits allow, written with generous whitespace and extra fields, still passes
    full = {"inputs": [[1.5] * N] * MAX_ROWS, "variant": "a,b,c", "routing_key": ",".join("x" * 100)}
    req = payload.parse_predict(json.dumps(full, indent=2).encode(), N, MAX_ROWS)
    assert req.X.shape == (MAX_ROWS, N)
    doc = {"inputs": [{"name": "input", "shape": [MAX_ROWS, N], "datatype": "FP32", "data": [[1.5] * N] * MAX_ROWS}],
           "parameters": {f"p{i}": i for i in range(100)}, "outputs": [{"name": "label"}, {"name": "probabilities"}]}
    assert oip.parse(json.dumps(doc).encode(), None, N, MAX_ROWS).X.shape == (MAX_ROWS, N)


def test_07_large_parses_run_off_the_event_loop():
    from service.traffic import INLINE_PARSE_BYTES, off_loop

    async def main():
        loop_thread = threading.get_ident()
        small = await off_loop(INLINE_PARSE_BYTES, threading.get_ident)
        large = await off_loop(INLINE_PARSE_BYTES + 1, threading.get_ident)
        return loop_thread, small, large

    loop_thread, small, large = asyncio.run(main())
    assert small == loop_thread, "a small body should be parsed inline (a thread hop costs more than the parse)"
    assert large != loop_thread, "a large body was parsed on the event loop"


def test_07_predict_rows_are_checked_before_numpy_sees_them(monkeypatch):
    """A row count or width beyond the limits is refused before np.array walks the whole document."""
    sizes = []
    real = np.array

    def spy(obj, *a, **k):
        sizes.append(len(obj) if isinstance(obj, list) else -1)
        return real(obj, *a, **k)

    monkeypatch.setattr(payload.np, "array", spy)
    wide = ('{"inputs": [' + "[" + ",".join(["0"] * 4000) + "]" + "]}").encode()  # within the value limit
    with pytest.raises(InputError, match=f"expected {N} features per row; got 4000"):
        payload.parse_predict(wide, N, MAX_ROWS)
    assert sizes == [], f"np.array ran on the oversized rows ({sizes})"


# ---- finding 10: strings, headers and OIP fields ----------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"inputs": [' + row().encode() + b'], "routing_key": "\\ud800"}',
    b'{"inputs": [' + row().encode() + b'], "variant": "a\\udfff"}',
    b'{"inputs": [' + row().encode() + b'], "\\ud800": 1}',
    b'{"inputs": [' + row("NaN").encode() + b'], "routing_key": "\\ud800"}',  # NaN and a surrogate together
    b'{"inputs": [' + row().encode() + b'], "routing_key": "\xed\xa0\x80"}',  # a surrogate encoded as raw bytes
    b'{"inputs": [' + row().encode() + b'], "routing_key": "\xff"}',  # not UTF-8
])
def test_10_lone_surrogates_and_bad_utf8_are_input_errors(body):
    with pytest.raises(InputError) as exc:
        payload.parse_predict(body, N, MAX_ROWS)
    orjson.dumps({"error": str(exc.value)})  # the message itself can be sent


def test_10_paired_surrogates_and_non_ascii_are_accepted():
    body = ('{"inputs": [' + row() + '], "routing_key": "\\ud83d\\ude00 ü 中", "variant": "é"}').encode()
    req = payload.parse_predict(body, N, MAX_ROWS)
    assert req.routing_key == "😀 ü 中" and req.variant == "é"
    assert req.X.shape == (1, N) and req.X.dtype == np.float32


@pytest.mark.parametrize("value", ["²", "0" * 5000, "-1", "+1", " 1", "1 ", "1_0", "1e3", "0x10", "", "١٢", "1" * 20, "12.0"])
def test_10_malformed_oip_header_lengths_are_input_errors(value):
    head = b'{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1,1,1,1,1,1,1,1]}]}'
    with pytest.raises(InputError, match="Inference-Header-Content-Length"):
        oip.parse(head, value, N, MAX_ROWS)


def test_10_header_length_accepts_ascii_digits_with_leading_zeros():
    head = b'{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1,1,1,1,1,1,1,1]}]}'
    req = oip.parse(head, "000" + str(len(head)), N, MAX_ROWS)
    assert req.X.shape == (1, N)


TENSOR = {"name": "input", "shape": [1, N], "datatype": "FP32", "data": [1.0] * N}


@pytest.mark.parametrize("request_doc", [
    {"inputs": [TENSOR], "parameters": [1]},
    {"inputs": [TENSOR], "parameters": "x"},
    {"inputs": [TENSOR], "parameters": {"binary_data_output": "yes"}},
    {"inputs": [TENSOR], "outputs": 5},
    {"inputs": [TENSOR], "outputs": {"name": "label"}},
    {"inputs": [TENSOR], "outputs": [{"name": "label", "parameters": "x"}]},
    {"inputs": [TENSOR], "outputs": [{"name": "label", "parameters": [1]}]},
    {"inputs": [TENSOR], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]},
    {"inputs": [TENSOR], "outputs": [{"name": ["label"]}]},
    {"inputs": [TENSOR], "outputs": ["label"]},
    {"inputs": [TENSOR], "id": 5},
    {"inputs": [TENSOR], "id": ["x"]},
    {"inputs": [{**TENSOR, "parameters": [1]}]},
    {"inputs": [{**TENSOR, "parameters": "x"}]},
    {"inputs": [{**TENSOR, "datatype": ["FP32"]}]},
    {"inputs": [{**TENSOR, "datatype": {"FP32": 1}}]},
    {"inputs": [{**TENSOR, "name": 5}]},
    {"inputs": [{**TENSOR, "name": {"a": 1}}]},
    {"inputs": [{**TENSOR, "shape": "1,8"}]},
    {"inputs": [{**TENSOR, "shape": [1.0, N]}]},
    {"inputs": [{**TENSOR, "data": {"a": 1}}]},
    {"inputs": [{**TENSOR, "data": [[1.0] * N, [1.0]]}]},
    {"inputs": [{**TENSOR, "data": [[[1.0] * N]]}]},
    {"inputs": [{**TENSOR, "data": [1.0] * (N - 1) + [None]}]},
    {"inputs": [{**TENSOR, "data": [1.0] * (N - 1) + ["1"]}]},
    {"inputs": [{k: v for k, v in TENSOR.items() if k != "data"}]},
    {"inputs": [{**TENSOR, "parameters": {"binary_data_size": "32"}}]},
    {"inputs": [{**TENSOR, "parameters": {"binary_data_size": True}}]},
    {"inputs": [{**TENSOR, "parameters": {"binary_data_size": 32.5}}]},
    {"inputs": TENSOR},
    {"inputs": [TENSOR, TENSOR]},
    {"inputs": ["x"]},
    [TENSOR],
])
def test_10_every_oip_field_is_type_checked(request_doc):
    with pytest.raises(InputError):
        oip.parse(json.dumps(request_doc).encode(), None, N, MAX_ROWS)


# ---- finding 11: booleans in OIP data ---------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(oip.DTYPES))
@pytest.mark.parametrize("data", [[True] + [1] * (N - 1), [1] * (N - 1) + [False], [[5] * (N - 1) + [True]], [True] * N])
def test_11_booleans_in_oip_data_are_refused(datatype, data):
    doc = {"inputs": [{"name": "input", "shape": [1, N], "datatype": datatype, "data": data}]}
    with pytest.raises(InputError, match="got boolean"):
        oip.parse(json.dumps(doc).encode(), None, N, MAX_ROWS)


def test_11_booleans_elsewhere_do_not_affect_numeric_data():
    doc = {"inputs": [{"name": "input", "shape": [2, N], "datatype": "INT64", "data": [[1] * N, [0] * N]}],
           "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    req = oip.parse(json.dumps(doc).encode(), None, N, MAX_ROWS)
    assert req.X.tolist() == [[1.0] * N, [0.0] * N] and req.outputs == {"probabilities": True}


# ---- issue 21 item 8: plain values in messages --------------------------------------------------


@pytest.mark.parametrize("values, shown", [
    (np.array([[1.0, 1e39]]), "got 1e+39"),
    (np.array([[np.nan, 1.0]], dtype=np.float32), "got nan"),
    (np.array([[1.0, -np.inf]], dtype=np.float16), "got -inf"),
])
def test_21_messages_print_plain_values_not_numpy_reprs(values, shown):
    with pytest.raises(InputError) as exc:
        payload.finite_float32(values, "inputs")
    assert shown in str(exc.value) and "np." not in str(exc.value), str(exc.value)


def test_21_binary_oip_nan_is_named_plainly():
    X = np.ones((1, N), dtype="<f4")
    X[0, 3] = np.nan
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, N], "datatype": "FP32",
                                   "parameters": {"binary_data_size": X.nbytes}}]}).encode()
    with pytest.raises(InputError) as exc:
        oip.parse(head + X.tobytes(), str(len(head)), N, MAX_ROWS)
    assert "input[0][3]" in str(exc.value) and "got nan" in str(exc.value) and "np." not in str(exc.value), str(exc.value)


# ---- the class stays closed: arbitrary documents through both parsers -------------------------

# lone surrogates (category Cs) included: st.text() would drop them, a list of characters keeps them
wild_text = st.lists(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=8).map("".join)
leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), wild_text)
docs = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(wild_text, kids, max_size=4)),
                    max_leaves=20)
predict_docs = st.fixed_dictionaries(
    {"inputs": st.one_of(docs, st.lists(st.lists(st.floats(width=32) | st.integers(-5, 5), min_size=N, max_size=N), min_size=1, max_size=3))},
    optional={"variant": docs, "routing_key": docs, "extra": docs})
tensor_docs = st.fixed_dictionaries(
    {"name": docs, "shape": st.one_of(st.just([1, N]), docs), "datatype": st.one_of(st.sampled_from(sorted(oip.DTYPES)), docs),
     "data": st.one_of(st.just([1.0] * N), docs)}, optional={"parameters": docs})
oip_docs = st.fixed_dictionaries({"inputs": st.one_of(st.lists(tensor_docs, min_size=1, max_size=2), docs)},
                                 optional={"id": docs, "parameters": docs, "outputs": st.one_of(docs, st.lists(docs, max_size=2))})


def encode(doc, raw_utf8: bool) -> bytes:
    """JSON bytes; surrogates are written as \\uXXXX escapes, or (raw_utf8) as the bytes Python's
    'surrogatepass' makes of them, which are not UTF-8. NaN/Infinity as the stdlib writes them."""
    if raw_utf8:
        return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(doc).encode()


@settings(max_examples=400, **FUZZ)
@given(doc=predict_docs, raw=st.booleans())
def test_10_any_predict_document_is_parsed_or_an_input_error(doc, raw):
    try:
        req = payload.parse_predict(encode(doc, raw), N, MAX_ROWS)
    except InputError as exc:
        orjson.dumps({"error": str(exc)})
        return
    assert req.X.dtype == np.float32 and req.X.shape[1] == N and np.isfinite(req.X).all()
    orjson.dumps({"variant": req.variant, "routing_key": req.routing_key})  # whatever is accepted can be echoed


@settings(max_examples=400, **FUZZ)
@given(doc=oip_docs, raw=st.booleans(), header=st.one_of(st.none(), st.text(max_size=6), st.integers(-5, 10**6).map(str)))
def test_10_any_oip_document_is_parsed_or_an_input_error(doc, raw, header):
    body = encode(doc, raw)
    try:
        req = oip.parse(body, header, N, MAX_ROWS)
    except InputError as exc:
        orjson.dumps({"error": str(exc)})
        return
    assert req.X.dtype == np.float32 and req.X.shape[1] == N and np.isfinite(req.X).all()
    orjson.dumps({"id": req.id, "parameters": req.parameters})


@settings(max_examples=300, **FUZZ)
@given(doc=docs, raw=st.booleans())
def test_10_any_json_document_is_parsed_or_an_input_error(doc, raw):
    try:
        out = payload.parse_json(encode(doc, raw))
    except InputError as exc:
        orjson.dumps({"error": str(exc)})
        return
    orjson.dumps(out)  # never a document that cannot be written back (lone surrogates)


def test_03_07_settings_are_read_from_the_environment():
    from service import config
    from service.traffic import Traffic

    default = config.load({}).http
    assert (default.body_timeout_s, default.max_small_body_bytes) == (5.0, 65536)
    s = config.load({"FUSION_BODY_TIMEOUT_S": "2.5", "FUSION_MAX_SMALL_BODY_BYTES": "1000"}).http
    assert (s.body_timeout_s, s.max_small_body_bytes) == (2.5, 1000)
    t = Traffic.from_settings(5, 2, s.body_timeout_s)
    assert (t.limit, t.body_timeout_s, t.inflight, t.admitted) == (3, 2.5, 0, 0)
