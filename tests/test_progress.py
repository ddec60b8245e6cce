"""Progress output: tqdm bars on a terminal only; in a log file or a pipe, one line per finished stage."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def nested(stream) -> None:
    """The zoo's shape: an outer bar over members, an inner (leave=False) bar over each member's epochs."""
    from fusion.progress import progress

    for _ in progress(range(3), desc="zoo", unit="member", stream=stream):
        for _ in progress(range(40), desc="mlp", unit="epoch", leave=False, stream=stream):
            pass


def test_off_a_terminal_nested_loops_write_one_plain_line():
    log = io.StringIO()
    nested(log)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert re.fullmatch(r"zoo: 3 members in \d+\.\d s\n", text), repr(text)


def test_on_a_terminal_there_are_bars():
    tty = Terminal()
    nested(tty)
    assert "\r" in tty.getvalue() and "zoo" in tty.getvalue() and "3/3" in tty.getvalue()


def test_an_early_stop_still_writes_its_line_with_the_postfix():
    from fusion.progress import progress

    log = io.StringIO()
    bar = progress(range(60), desc="distill", unit="epoch", stream=log)
    for epoch in bar:
        bar.set_postfix(best=epoch)
        if epoch == 4:
            break
    bar.close()
    bar.close()  # once only
    assert re.fullmatch(r"distill: 5 epochs in \d+\.\d s, best=4\n", log.getvalue()), repr(log.getvalue())


def test_stage_writes_one_line():
    from fusion.progress import stage

    log = io.StringIO()
    with stage("build: members exported", stream=log):
        pass
    assert re.fullmatch(r"build: members exported in \d+\.\d s\n", log.getvalue())


def test_no_fusion_module_uses_tqdm_directly():
    """Every loop goes through fusion.progress, so none can draw bars into a log file."""
    offenders = []
    for path in sorted((ROOT / "fusion").rglob("*.py")):
        if path.name == "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "tqdm" for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"expected progress through fusion.progress; these import tqdm: {offenders}"
