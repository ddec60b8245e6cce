"""Cases 11 and 12: fuzzing the HTTP API.

11. Schemathesis against the service's own OpenAPI document (`/docs.json`, service/openapi.py):
    positive and negative cases for every operation; no 5xx, invalid data -> 4xx, every response
    (status, content type, headers, body) as the document says.
12. Hypothesis on `/predict` and the OIP infer endpoint: wrong shapes and dtypes, empty and
    oversized batches, NaN/Inf, huge numbers: 4xx, never 5xx, never a 200 with a non-finite value;
    valid inputs equal the offline prediction of the served bundle.

Both also send what JSON encoders are reluctant to write (issue 13, finding 10): non-ASCII text and
lone surrogates in every string (routing keys, variants, feedback ids, OIP ids, names and
parameters, object keys), as `\\uXXXX` escapes and as the raw bytes Python's "surrogatepass" makes
of them (not UTF-8), and malformed `Inference-Header-Content-Length` values (non-ASCII digits,
thousands of zeros, signs, spaces, numbers beyond the body). Bodies go out as raw bytes.

Both are derandomized (the same examples every run) and bounded by example counts.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.reliability import bundles
from tests.reliability.conftest import MAX_ROWS
from tests.reliability.harness import record

pytestmark = pytest.mark.server

N = bundles.N_FEATURES
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
EXAMPLES = 40  # per operation and mode (schemathesis)


# ---- case 11: schemathesis -------------------------------------------------------------------


@pytest.mark.slow
def test_11_schemathesis_against_our_openapi(main_server, auth, v1):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, negative_data_rejection, response_headers_conformance,
        response_schema_conformance, status_code_conformance,
    )

    doc = httpx.get(main_server.url + "/docs.json", timeout=10).json()
    assert doc["openapi"].startswith("3.") and "/predict" in doc["paths"] and "/v2/models/{name}/infer" in doc["paths"]
    schema = schemathesis.openapi.from_dict(doc)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance, negative_data_rejection]
    admin = httpx.Client(base_url=main_server.url, headers=auth["admin"], timeout=30)
    routing_before = {k: v for k, v in admin.get("/admin/routing").json().items() if k != "request_id"}
    per_op, failures, sent, statuses = {}, [], 0, {}
    t0 = time.monotonic()
    try:
        passes = []
        for result in schema.get_all_operations():
            op = result.ok()
            passes += [(op, mode, None) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
            if "{name}" in op.path:  # random names only reach the 404; also fuzz the served models
                passes += [(op, mode, {"name": name}) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                           for name in ("fusion", "members")]
        for op, mode, path_parameters in passes:
            headers = auth["admin"] if op.path.startswith("/admin") else auth["inference"]
            seen = []

            # no shrinking: a failing schemathesis case is recorded in `failures` with its response, and
            # shrinking these composite cases can take tens of minutes (one full run hung in it)
            @settings(max_examples=EXAMPLES, phases=[Phase.explicit, Phase.reuse, Phase.generate], **FUZZ)
            @given(case=op.as_strategy(generation_mode=mode, path_parameters=path_parameters),
                   wild=st.lists(wild_text, min_size=1, max_size=3), inject=st.integers(0, 2), raw=st.booleans())
            def run(case, wild, inject, raw):
                if inject == 0 and isinstance(case.body, (dict, list)):
                    # schemathesis' strings are valid UTF-8; a third of the bodies also carry surrogates
                    # and other odd text, sent as bytes (its JSON encoder would refuse surrogates)
                    case.body = raw_json(with_wild_strings(case.body, wild), raw)
                try:
                    response = case.call(base_url=main_server.url, headers=headers, timeout=30)
                except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure too
                    failures.append(f"{op.label} [{mode.value}]: no response: {type(exc).__name__}: {exc}")
                    raise
                seen.append(response.status_code)
                try:
                    case.validate_response(response, checks=checks)
                except Exception as exc:  # noqa: BLE001 - collected, reported together below
                    failures.append(f"{op.label} [{mode.value}] -> {response.status_code}: {str(exc)[:600]}")
                    raise

            try:
                run()
            except (Exception, BaseExceptionGroup):  # noqa: BLE001 - the failure is in `failures`
                pass
            sent += len(seen)
            for s in seen:
                statuses[s] = statuses.get(s, 0) + 1
            label = op.label if not path_parameters else op.label.replace("{name}", path_parameters["name"])
            per_op[f"{label} [{mode.value}]"] = sorted(set(seen))
    finally:
        admin.post("/admin/routing", json=routing_before)
        admin.post("/admin/bundle", json={"path": str(v1)})
    record("11_schema_fuzz", operations=len({k.split(" [")[0] for k in per_op}), requests_sent=sent,
           seconds=round(time.monotonic() - t0, 1), statuses=statuses, failures=len(failures), statuses_by_operation=per_op)
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert not any(s >= 500 for s in statuses), statuses


# ---- strings JSON encoders are reluctant to write (finding 10) -----------------------------------

# any code point, lone surrogates (category Cs) included; hypothesis leaves those out by default
wild_char = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("\u00b2\u0663\ufeff\u202e\x00\"\\"))
wild_text = st.lists(wild_char, min_size=1, max_size=10).map("".join)  # st.text() would drop the surrogates


def with_wild_strings(doc, wild: list[str]):
    """`doc` with its string values and object keys replaced, in turn, by the `wild` strings; a
    document without strings gains a key."""
    it = iter(wild * 64)

    def walk(v):
        if isinstance(v, str):
            return next(it)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {(next(it) if i == 0 else k): walk(x) for i, (k, x) in enumerate(v.items())}
        return v

    out = walk(doc)
    if isinstance(out, dict) and not out:
        out[wild[0]] = wild[-1]
    return out


def raw_json(doc, raw_utf8: bool) -> bytes:
    """JSON bytes: surrogates as \\uXXXX escapes (the stdlib's ensure_ascii), or written as raw bytes
    with 'surrogatepass' (ill-formed UTF-8 a careless client would send)."""
    if raw_utf8:
        return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(doc).encode()


# ---- case 12: hypothesis on the inputs -------------------------------------------------------


@pytest.fixture(scope="module")
def client(main_server, auth):
    with httpx.Client(base_url=main_server.url, headers={**auth["inference"], "Content-Type": "application/json"},
                      timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def offline_session(v1):
    import onnxruntime as ort

    from fusion.bundle import read_bundle

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(read_bundle(v1).read_verified("ensemble"), opts, providers=["CPUExecutionProvider"])
    return lambda X: sess.run(None, {"input": np.asarray(X, dtype=np.float32)})[0]


TALLY: dict[str, dict] = {}


def tally(kind: str, status: int) -> None:
    t = TALLY.setdefault(kind, {})
    t[status] = t.get(status, 0) + 1


def all_finite(x) -> bool:
    if isinstance(x, list):
        return all(all_finite(v) for v in x)
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


pixel = st.floats(0, 16, width=32)
rows_ok = st.lists(st.lists(pixel, min_size=N, max_size=N), min_size=1, max_size=8)
f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)  # the whole finite float32 range
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.lists(st.integers(), max_size=2))


@st.composite
def bad_bodies(draw) -> tuple[str, bytes]:
    """(kind, raw JSON body) that must be refused with a 4xx."""
    kind = draw(st.sampled_from(["row_length", "junk_value", "empty", "not_rows", "too_many_rows", "nan_inf",
                                 "beyond_float32", "bad_field", "bad_variant", "nested_deeper", "top_level"]))
    row = [1.0] * N
    if kind == "row_length":
        n = draw(st.integers(0, 2 * N).filter(lambda k: k != N))
        body = {"inputs": [[1.0] * n]}
    elif kind == "junk_value":
        i = draw(st.integers(0, N - 1))
        body = {"inputs": [row[:i] + [draw(junk)] + row[i + 1:]]}
    elif kind == "empty":
        body = {"inputs": draw(st.sampled_from([[], [[]], {}]))}
    elif kind == "not_rows":
        body = {"inputs": draw(st.one_of(junk, st.floats(allow_nan=False), st.lists(st.floats(0, 1), min_size=N, max_size=N)))}
    elif kind == "too_many_rows":
        body = {"inputs": [row] * draw(st.integers(MAX_ROWS + 1, MAX_ROWS + 40))}
    elif kind == "nan_inf":
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]))
        i = draw(st.integers(0, N - 1))
        cells = ["1.0"] * N
        cells[i] = token
        return kind, ('{"inputs": [[' + ",".join(cells) + "]]}").encode()
    elif kind == "beyond_float32":
        v = draw(st.floats(min_value=3.5e38, max_value=1.7e308)) * draw(st.sampled_from([1, -1]))
        i = draw(st.integers(0, N - 1))
        body = {"inputs": [row[:i] + [v] + row[i + 1:]]}
    elif kind == "bad_field":
        body = {"inputs": [row], draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("inputs", "variant", "routing_key"))): 1}
    elif kind == "bad_variant":
        body = {"inputs": [row], "variant": draw(st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2),
                                                            st.from_regex(r"[a-z]{1,10}", fullmatch=True).filter(lambda s: s not in VARIANTS)))}
    elif kind == "nested_deeper":
        body = {"inputs": [[row]]}
    else:
        body = draw(st.one_of(junk, st.lists(st.lists(pixel, min_size=N, max_size=N), min_size=1, max_size=2)))
    return kind, json.dumps(body).encode()


VARIANTS = {"ensemble", "members", "cascade", *bundles.MEMBERS}


def test_12_valid_inputs_equal_the_offline_prediction(client, offline_session, v1):
    version = bundles.version_of(v1)

    @settings(max_examples=60, **FUZZ)
    @given(rows=rows_ok)
    def run(rows):
        r = client.post("/predict", content=json.dumps({"inputs": rows}))
        tally("valid", r.status_code)
        assert r.status_code == 200, r.text
        body = r.json()
        expected = offline_session(rows)
        assert body["bundle_version"] == version
        assert np.allclose(body["probabilities"], expected, atol=1e-5)
        assert body["predictions"] == expected.argmax(-1).tolist()

    run()


def test_12_invalid_inputs_are_4xx_never_5xx(client):
    @settings(max_examples=250, **FUZZ)
    @given(case=bad_bodies())
    def run(case):
        kind, body = case
        r = client.post("/predict", content=body)
        tally(kind, r.status_code)
        assert 400 <= r.status_code < 500, (kind, body[:200], r.status_code, r.text[:300])
        assert set(r.json()) == {"error", "request_id"}

    run()


def test_12_extreme_finite_inputs_never_answer_non_finite(client, offline_session):
    """Finite float32 inputs of any magnitude: 200 with finite outputs equal to the offline ones,
    or 400 when the model's own output is not finite for them. Never 5xx, never NaN/Inf/null."""

    @settings(max_examples=120, **FUZZ)
    @given(rows=st.lists(st.lists(f32, min_size=N, max_size=N), min_size=1, max_size=4))
    @example(rows=[[3e38, -3e38] * (N // 2)])  # +inf and -inf meet inside the first layer: NaN
    @example(rows=[[1.0] * N, [3e38, -3e38] * (N // 2)])  # one bad row among good ones
    @example(rows=[[3e38] * N])
    def run(rows):
        r = client.post("/predict", content=json.dumps({"inputs": rows}))
        tally("extreme_finite", r.status_code)
        expected = offline_session(rows)
        if np.isfinite(expected).all():
            assert r.status_code == 200, r.text[:300]
            assert all_finite(r.json()["probabilities"])
            assert np.allclose(r.json()["probabilities"], expected, atol=1e-5)
        else:
            assert r.status_code == 400 and "non-finite" in r.json()["error"], r.text[:300]

    run()


@st.composite
def oip_requests(draw) -> tuple[str, dict]:
    dtype = draw(st.one_of(st.sampled_from(["FP32", "FP64", "INT64", "UINT8", "FP16"]), st.text(max_size=6), st.none()))
    b = draw(st.integers(-1, 4))
    shape = draw(st.one_of(st.just([b, N]), st.lists(st.integers(-2, 70), max_size=3), junk))
    n = draw(st.integers(0, 3 * N))
    data = draw(st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n),
                          st.lists(pixel, min_size=max(b, 0) * N, max_size=max(b, 0) * N), junk))
    return "oip", {"inputs": [{"name": "input", "shape": shape, "datatype": dtype, "data": data}]}


def test_12_oip_tensors_wrong_shapes_and_dtypes(client):
    @settings(max_examples=150, **FUZZ)
    @given(case=oip_requests())
    @example(case=("oip", {"inputs": [{"name": "input", "shape": [2, N], "datatype": "FP32", "data": [1.0] * 2 * N}]}))
    @example(case=("oip", {"inputs": [{"name": "input", "shape": [1, N], "datatype": "FP64", "data": [3e38, -3e38] * (N // 2)}]}))
    @example(case=("oip", {"inputs": [{"name": "input", "shape": [1, N], "datatype": "FP64", "data": [1e300] * N}]}))
    def run(case):
        kind, body = case
        r = client.post("/v2/models/fusion/infer", content=json.dumps(body))
        tally(kind, r.status_code)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code == 200:
            assert all(all_finite(o["data"]) for o in r.json()["outputs"]), r.text[:300]
        else:
            assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "request_id"}

    run()
    record("12_input_fuzz", examples_by_kind=TALLY,
           requests_sent=sum(sum(v.values()) for v in TALLY.values()),
           server_errors=sum(n for v in TALLY.values() for s, n in v.items() if s >= 500))


def well_formed_unicode(body: bytes) -> bool:
    """Whether the body is UTF-8 and no string in it (keys included) holds a lone surrogate."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False

    def ok(v) -> bool:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
            return True
        if isinstance(v, list):
            return all(map(ok, v))
        if isinstance(v, dict):
            return all(ok(k) and ok(x) for k, x in v.items())
        return True

    return ok(doc)


def _contract(r: httpx.Response, what) -> None:
    """Never 5xx; an error is 4xx in the one shape, as JSON the server could write."""
    assert r.status_code < 500, (what, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), (what, r.headers)
        assert set(r.json()) == {"error", "request_id"}, (what, r.text[:300])


@st.composite
def odd_string_requests(draw) -> tuple[str, str, bytes, dict]:
    """(kind, path, body, extra headers) with non-ASCII or surrogate text in a string the server reads."""
    text = draw(wild_text)
    raw = draw(st.booleans())
    row = [1.0] * N
    kind = draw(st.sampled_from(["routing_key", "variant", "field_name", "feedback_id", "feedback_label",
                                 "oip_id", "oip_name", "oip_datatype", "oip_parameters", "oip_output", "echo",
                                 "variant_header", "routing_header"]))
    headers, path = {}, "/predict"
    if kind in ("routing_key", "variant"):
        doc = {"inputs": [row], kind: text}
    elif kind == "field_name":
        doc = {"inputs": [row], text: 1}
    elif kind in ("variant_header", "routing_header"):
        doc = {"inputs": [row]}
        # header values travel as bytes: UTF-8 (surrogatepass) or latin-1, kept to what HTTP allows in a
        # value (no control bytes: uvicorn refuses those itself, with a plain-text 400, before any route)
        value = text.encode("utf-8", "surrogatepass") if raw else text.encode("latin-1", "replace")
        value = bytes(b for b in value if b >= 0x20 and b != 0x7F).strip() or b"x"
        headers["X-Variant" if kind == "variant_header" else "X-Routing-Key"] = value
    elif kind == "feedback_id":
        path, doc = "/feedback", {"request_id": text, "label": 1}
    elif kind == "feedback_label":
        path, doc = "/feedback", {"request_id": "0" * 32, "labels": [text]}
    elif kind == "echo":
        path, doc = "/echo", {text: [text, {text: text}]}
    else:
        path = "/v2/models/fusion/infer"
        tensor = {"name": "input", "shape": [1, N], "datatype": "FP32", "data": row}
        doc = {"inputs": [tensor]}
        if kind == "oip_id":
            doc["id"] = text
        elif kind == "oip_name":
            tensor["name"] = text
        elif kind == "oip_datatype":
            tensor["datatype"] = text
        elif kind == "oip_parameters":
            doc["parameters"] = {text: text}
        else:
            doc["outputs"] = [{"name": text, "parameters": {"binary_data": False}}]
    return kind, path, raw_json(doc, raw), headers


def test_12_non_ascii_and_surrogate_strings_never_5xx(client):
    @settings(max_examples=200, **FUZZ)
    @given(case=odd_string_requests())
    @example(case=("routing_key", "/predict", b'{"inputs": [[' + b",".join([b"1"] * N) + b']], "routing_key": "\\ud800"}', {}))
    @example(case=("variant", "/predict", b'{"inputs": [[' + b",".join([b"1"] * N) + b']], "variant": "\\udfff"}', {}))
    @example(case=("feedback_id", "/feedback", b'{"request_id": "\\ud800", "label": 1}', {}))
    @example(case=("echo", "/echo", b'{"a": "\xed\xa0\x80"}', {}))
    def run(case):
        kind, path, body, headers = case
        r = client.post(path, content=body, headers=headers)
        tally(f"strings_{kind}", r.status_code)
        _contract(r, (kind, body[:120], headers))
        if not well_formed_unicode(body):  # a lone surrogate or bytes that are not UTF-8: refused as a whole
            assert r.status_code == 400, (kind, body[:120], r.status_code, r.text[:300])
        if kind == "echo" and r.status_code == 200:
            assert r.json() == json.loads(body), (body[:200], r.text[:200])

    run()


HEAD = json.dumps({"inputs": [{"name": "input", "shape": [1, N], "datatype": "FP32", "data": [1.0] * N}]}).encode()
odd_lengths = st.one_of(
    st.sampled_from(["\u00b2", "\u0663", "0" * 5000, "9" * 5000, "-1", "+1", " 1", "1 ", "1_0", "1e3", "0x10", "", "12.0"]),
    st.text(alphabet=st.sampled_from("0123456789\u00b2\u00b3\u00b9\u0660\uff11 -+._e"), max_size=30),
    st.integers(-10, 10**30).map(str),
    st.just(str(len(HEAD))),
)


def test_12_malformed_oip_header_lengths_are_400(client):
    @settings(max_examples=120, **FUZZ)
    @given(value=odd_lengths, encoding=st.sampled_from(["utf-8", "latin-1"]))
    @example(value="\u00b2", encoding="latin-1")
    @example(value="0" * 5000, encoding="utf-8")
    def run(value, encoding):
        header = value.encode(encoding, "replace").strip()  # HTTP strips the spaces around a value anyway
        r = client.post("/v2/models/fusion/infer", content=HEAD,
                        headers={"Inference-Header-Content-Length": header, "Content-Type": "application/json"})
        tally("oip_header_length", r.status_code)
        _contract(r, (value[:40], encoding))
        text = header.decode("latin-1")  # what the server sees
        digits = text.isascii() and text.isdigit() and len(text) <= 18
        if digits and int(text) == len(HEAD):
            assert r.status_code == 200, r.text[:300]
        elif text == "":
            assert r.status_code in (200, 400), r.text[:300]  # an empty value may be dropped on the way
        elif digits:
            assert r.status_code == 400, (text, r.text[:300])  # a well-formed length that splits the body wrongly
        else:
            assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"], (text[:40], r.text[:300])

    run()
    record("12_strings_and_headers", examples_by_kind={k: v for k, v in TALLY.items() if k.startswith(("strings_", "oip_header"))})
