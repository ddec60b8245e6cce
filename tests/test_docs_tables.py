"""Every Markdown table in the README and the docs renders as a table: it has a header row.

Checked with a Markdown parser (markdown-it-py with the GFM table rule), not a regex: a block of pipe
rows with no header + delimiter pair does not parse as a table but as a paragraph of raw pipes, which is
what a reader then sees. Such rows are what this test looks for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.markdown_tables import pipe_rows_outside_tables, tables

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "artifacts", "node_modules", "test-artifacts", ".pytest_cache"}


def markdown_files() -> list[Path]:
    """README.md, docs/**/*.md and every other Markdown file of the project (deploy/README.md, ...)."""
    return sorted(p for p in ROOT.rglob("*.md")
                  if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts) and ".egg-info" not in str(p))


def test_the_check_sees_a_table_without_a_header():
    """The detector itself: a headerless pipe block is flagged, a proper table is not."""
    broken = "Text.\n\n|---|---|\n| a | 1 |\n| b | 2 |\n"
    good = "Text.\n\n| name | n |\n|---|--:|\n| a | 1 |\n"
    assert [n for n, _ in pipe_rows_outside_tables(broken)] == [3, 4, 5]
    assert pipe_rows_outside_tables(good) == [] and tables(good)[0].header == ("name", "n")
    in_code = "```\n| not | a table |\n```\n"
    assert pipe_rows_outside_tables(in_code) == []


def test_markdown_files_are_found():
    names = {str(p.relative_to(ROOT)) for p in markdown_files()}
    assert {"README.md", "docs/comparison.md", "docs/BENCHMARKS.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_has_a_header_row(path):
    text = path.read_text()
    bad = pipe_rows_outside_tables(text)
    assert not bad, (f"{path.relative_to(ROOT)}: expected every pipe row inside a table with a header row and a "
                     f"|---| delimiter row; got rows that render as raw pipes:\n"
                     + "\n".join(f"  line {n}: {line[:100]}" for n, line in bad[:10]))
    for t in tables(text):
        assert any(cell.strip() for cell in t.header), (
            f"{path.relative_to(ROOT)} line {t.line}: expected a header row naming the columns; got {list(t.header)}")
