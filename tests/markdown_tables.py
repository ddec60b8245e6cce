"""Markdown tables as a Markdown parser sees them (markdown-it-py with the GFM table rule), for the
tests that check the README and docs: which pipe rows render as a table, and each table's cells."""

from __future__ import annotations

from dataclasses import dataclass

from markdown_it import MarkdownIt


@dataclass(frozen=True)
class Table:
    line: int  # 1-based line of the header row
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def column(self, name: str) -> int:
        if name not in self.header:
            raise KeyError(f"expected a column '{name}'; the table has {list(self.header)}")
        return self.header.index(name)

    def by_first_cell(self) -> dict[str, dict[str, str]]:
        """{first cell (backticks stripped): {column: cell}}."""
        return {r[0].strip("`"): dict(zip(self.header, r)) for r in self.rows}


def parser() -> MarkdownIt:
    return MarkdownIt("commonmark").enable("table")


def tables(text: str) -> list[Table]:
    """Every table the parser finds, with its header and body cells (inline Markdown source)."""
    tokens = parser().parse(text)
    out, i = [], 0
    while i < len(tokens):
        if tokens[i].type != "table_open":
            i += 1
            continue
        line, header, rows, row, section = tokens[i].map[0] + 1, [], [], [], "head"
        while tokens[i].type != "table_close":
            t = tokens[i]
            if t.type == "tbody_open":
                section = "body"
            elif t.type == "inline":
                row.append(t.content)
            elif t.type == "tr_close":
                (header.extend if section == "head" else rows.append)(row if section == "head" else tuple(row))
                row = []
            i += 1
        out.append(Table(line, tuple(header), tuple(rows)))
    return out


def pipe_rows_outside_tables(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that starts with `|` but ended up in a paragraph, not a table:
    a pipe block without a header + delimiter pair, which renders as raw pipes."""
    tokens = parser().parse(text)
    bad = []
    for open_, inline in zip(tokens, tokens[1:]):
        if open_.type != "paragraph_open" or inline.type != "inline" or open_.map is None:
            continue
        for offset, line in enumerate(inline.content.splitlines()):
            if line.lstrip().startswith("|"):
                bad.append((open_.map[0] + offset + 1, line))
    return bad
