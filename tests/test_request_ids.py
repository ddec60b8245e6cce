"""One request-id rule for the handlers and for the admission middleware's 429s (service/errors.py)."""

from __future__ import annotations

import re

import pytest

from service.errors import request_id_from
from service.traffic import _request_id


@pytest.mark.parametrize("given", ["my-req.1", "A_b-9", "x" * 64])
def test_a_safe_client_id_is_kept(given):
    assert request_id_from(given) == given
    assert _request_id({"headers": [(b"x-request-id", given.encode())]}) == given


@pytest.mark.parametrize("given", [None, "", "x" * 65, "a b", "ünï", "id\r\nX-Evil: 1", "../etc"])
def test_anything_else_gets_a_fresh_random_id(given):
    rid = request_id_from(given)
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    headers = [] if given is None else [(b"x-request-id", given.encode())]
    assert re.fullmatch(r"[0-9a-f]{32}", _request_id({"headers": headers}))


def test_fresh_ids_differ():
    assert len({request_id_from(None) for _ in range(1000)}) == 1000
