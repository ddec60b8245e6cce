"""The exception tree drawn in fusion/errors.py's docstring is the real one (issue 14).

The drawing is parsed (box-drawing indentation gives the parent) and compared with the classes:
every project subclass of FusionError, found recursively through `__subclasses__()` after importing
every module of fusion/ and service/ that defines an error class, is drawn once under its direct
parent, with its module, its direct builtin bases and the HTTP status service.errors gives it;
nothing is drawn that does not exist.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import fusion.errors
from fusion.errors import FusionError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion", "service")
LINE = re.compile(
    r"^(?P<tree>[ │├└─]*?)(?P<name>[A-Z]\w*)(?: \((?P<builtins>[\w, ]+)\))?(?: \[(?P<module>[\w.]+)\])?"
    r"(?:\s{2,}.*?)?(?:\s+-> (?P<status>\d{3}(?:/\d{3})*))?\s*$"
)


@dataclass(frozen=True)
class Drawn:
    name: str
    parent: str | None
    builtins: tuple[str, ...]
    module: str
    statuses: tuple[int, ...]


def drawn_tree(doc: str) -> dict[str, Drawn]:
    """The classes of the first tree in `doc` (from the line `FusionError` to the first blank line)."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "FusionError")
    root_col = lines[start].index("FusionError")
    out: dict[str, Drawn] = {}
    stack: list[str] = []  # names by depth
    for line in lines[start:]:
        if not line.strip():
            break
        m = LINE.match(line[root_col:])
        assert m, f"expected a tree line 'Name (Builtins) [module]  description  -> status'; got {line!r}"
        depth, rem = divmod(len(m["tree"]), 4)
        assert rem == 0 and depth <= len(stack), f"expected 4 columns of tree per level; got {line!r}"
        del stack[depth:]
        name = m["name"]
        assert name not in out, f"{name} is drawn twice"
        out[name] = Drawn(
            name, stack[-1] if stack else None,
            tuple(b.strip() for b in m["builtins"].split(",")) if m["builtins"] else (),
            m["module"] or "fusion.errors",
            tuple(int(s) for s in m["status"].split("/")) if m["status"] else (),
        )
        stack.append(name)
    return out


def error_modules() -> list[str]:
    """Every module of the project packages that defines an error class (so its subclasses are registered)."""
    mods = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if re.search(r"^class \w+\([^)]*(Error|Exception)\b", path.read_text(encoding="utf-8"), re.M):
                mods.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return mods


def real_tree() -> dict[str, type]:
    for mod in error_modules():
        importlib.import_module(mod)
    out: dict[str, type] = {}
    todo = [FusionError]
    while todo:
        cls = todo.pop()
        if cls.__module__.split(".")[0] in PACKAGES:  # not a test's own subclass
            assert cls.__name__ not in out or out[cls.__name__] is cls, f"two error classes named {cls.__name__}"
            out[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return out


def test_error_modules_are_found():
    mods = error_modules()
    assert {"fusion.errors", "service.errors", "service.onnx_check"} <= set(mods), mods


def mismatches(doc: str) -> list[str]:
    """What differs between the tree drawn in `doc` and the classes: one line per problem."""
    from service.errors import status_for

    drawn, real = drawn_tree(doc), real_tree()
    problems = [f"{n}: an error class not drawn" for n in sorted(set(real) - set(drawn))]
    problems += [f"{n}: drawn, but no such class" for n in sorted(set(drawn) - set(real))]
    for name in sorted(set(drawn) & set(real)):
        d, cls = drawn[name], real[name]
        if cls.__module__ != d.module:
            problems.append(f"{name}: drawn in [{d.module}]; defined in {cls.__module__}")
        parents = [b.__name__ for b in cls.__bases__ if issubclass(b, FusionError)]
        if parents != ([d.parent] if d.parent else []):
            problems.append(f"{name}: drawn under {d.parent}; its parents are {parents}")
        others = sorted(b.__name__ for b in cls.__bases__ if not issubclass(b, FusionError) and b is not Exception)
        if sorted(d.builtins) != others:
            problems.append(f"{name}: drawn with builtins {list(d.builtins)}; inherits {others} directly")
        status = status_for(cls("x"))
        if (status not in d.statuses) if d.statuses else status != 500:
            problems.append(f"{name}: drawn -> {d.statuses or 'nothing (500)'}; service.errors.status_for gives {status}")
    return problems


def test_drawn_tree_is_the_class_tree():
    assert mismatches(fusion.errors.__doc__) == []


def test_mismatches_catch_drift():
    """A wrong parent, a missing class, an invented one, a wrong builtin, module and status are all seen."""
    doc = fusion.errors.__doc__
    assert drawn_tree(doc)["UnknownNameError"] == Drawn("UnknownNameError", "InputError", ("KeyError",), "fusion.errors", (404,))
    assert drawn_tree(doc)["AuthError"].statuses == (401, 403)
    drifted = (
        doc.replace("│   ├── PayloadTooLargeError  ", "├── PayloadTooLargeError      ")  # drawn at the top level
        .replace("    │   ├── DataFormatError ", "    │   ├── MadeUpError     ")
        .replace("BundleError (OSError)", "BundleError (IOError)")  # IOError is OSError: still the same name check
        .replace("ExportError (RuntimeError)", "ExportError (ValueError)")
        .replace("OverloadedError [service.errors]", "OverloadedError [service.app]   ")
        .replace("-> 504", "-> 503")
    )
    assert drifted != doc
    found = "\n".join(mismatches(drifted))
    for expected in ("PayloadTooLargeError: drawn under FusionError", "DataFormatError: an error class not drawn",
                     "MadeUpError: drawn, but no such class", "BundleError: drawn with builtins ['IOError']",
                     "ExportError: drawn with builtins ['ValueError']", "OverloadedError: drawn in [service.app]",
                     "DeadlineError: drawn -> (503,)"):
        assert expected in found, f"expected '{expected}' among the mismatches; got:\n{found}"
