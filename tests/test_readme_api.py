"""The README's API table and service/app.py's routes are the same set of (method, path) pairs.

Every route the Starlette app serves has a row, and every row is either one of those routes or one
of the endpoints BentoML serves itself (`UnknownPath.BENTOML_PATHS`). The table is read with a
Markdown parser (markdown-it-py), not a regex: the first cell of a row holds `METHOD /path` code
spans; a bare `/path` span after it takes the same method.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "The HTTP API"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
SPAN = re.compile(rf"^(?:(?P<methods>(?:{'|'.join(METHODS)})(?:, (?:{'|'.join(METHODS)}))*) )?(?P<path>/\S*)$")


def api_table(text: str) -> list[tuple[str, list[str]]]:
    """(first cell's text, its code spans) per body row of the first table under `## The HTTP API`."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    start = next((i for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2"
                  and tokens[i + 1].content == SECTION), None)
    assert start is not None, f"expected a '## {SECTION}' section in README.md"
    rows, in_body, cell = [], False, 0
    for i in range(start + 1, len(tokens)):
        t = tokens[i]
        if t.type == "heading_open" and t.tag == "h2":
            break
        if t.type == "tbody_open":
            in_body = True
        elif t.type == "tbody_close":
            break
        elif in_body and t.type == "tr_open":
            cell = 0
        elif in_body and t.type == "td_open":
            cell += 1
            if cell == 1:
                inline = tokens[i + 1]
                rows.append((inline.content, [c.content for c in inline.children or [] if c.type == "code_inline"]))
    assert rows, f"expected a table with a body under '## {SECTION}' in README.md"
    return rows


def endpoints(rows: list[tuple[str, list[str]]]) -> set[tuple[str, str]]:
    """{(method, path)} from the rows' code spans."""
    out = set()
    for text, spans in rows:
        assert spans, f"expected `METHOD /path` in the first cell; got {text!r}"
        methods: list[str] = []
        for span in spans:
            m = SPAN.match(span)
            assert m, f"expected `METHOD /path` or `/path` in the API table; got `{span}` (row {text!r})"
            if m["methods"]:
                methods = m["methods"].split(", ")
            assert methods, f"expected a method before `{span}` (row {text!r})"
            out |= {(method, m["path"]) for method in methods}
    return out


def served() -> set[tuple[str, str]]:
    from service.app import UnknownPath, routes

    out = set()
    for route in routes.routes:
        if isinstance(route, UnknownPath):  # the catch-all 404, no endpoint of its own
            continue
        out |= {(method, route.path) for method in route.methods - {"HEAD"}}  # Starlette adds HEAD to GET
    return out


def test_the_parser_reads_methods_and_continued_paths():
    text = ("## The HTTP API\n\n| endpoint | what |\n|---|---|\n| `GET /a`, `/b` | x |\n| `GET, POST /c` | y |\n"
            "| `POST /d/{name}/e` | z |\n\n## Next\n\n| `GET /z` | not this one |\n|---|---|\n")
    assert endpoints(api_table(text)) == {("GET", "/a"), ("GET", "/b"), ("GET", "/c"), ("POST", "/c"), ("POST", "/d/{name}/e")}


def test_every_route_is_in_the_readme_api_table_and_back():
    from service.app import UnknownPath

    table, routes = endpoints(api_table(README.read_text())), served()
    missing = sorted(routes - table)
    assert not missing, f"expected every route of service/app.py in README's API table; missing {missing}"
    bentoml_own = {("GET", p) for p in UnknownPath.BENTOML_PATHS}
    unknown = sorted(table - routes - bentoml_own)
    assert not unknown, (f"expected the README's API table to list only served endpoints; {unknown} are neither "
                         f"routes of service/app.py nor BentoML's own {sorted(UnknownPath.BENTOML_PATHS)}")
    assert ("GET", "/admin/routing") in table  # used in the README's shell block
