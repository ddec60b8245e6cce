"""`python -m service.serve SERVICE [bentoml serve options]`: `bentoml serve`, plus the line that says it is ready.

`make serve` runs this. It is `python -m bentoml serve ...` in this very process (the same arguments, the
same process tree, the same signals and exit code), with one daemon thread that polls `/readyz` and, once it
answers 200, prints where the server listens and one curl that calls it. The service cannot print this
itself: its workers get an already bound socket from BentoML and do not know the address a user calls,
and readiness (bundle verified, loaded, warmed up) is only known from outside the worker that reaches it.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from fusion.errors import ConfigError
from service import config
from service.auth import Tokens
from service.config import ServeSettings

POLL_S = 0.5
READY_PREFIX = "fusion-serve ready:"


def address(argv: list[str], defaults: ServeSettings) -> str:
    """The base URL to call, from `bentoml serve`'s own options (defaults: their BENTOML_HOST/PORT
    variables, read by service/config.py). A wildcard bind address (0.0.0.0, ::) is called through loopback."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-p", "--port", type=int, default=defaults.port)
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--ssl-certfile")
    ns, _ = p.parse_known_args(argv)
    host = "127.0.0.1" if ns.host in ("0.0.0.0", "", "::") else ns.host
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if ns.ssl_certfile else 'http'}://{host}:{ns.port}"


def example_row(bundle: Path) -> tuple[str, list[float]]:
    """(bundle version, one input row) from the bundle's manifest: its first probe row (a real test row),
    or zeros of the input's width. The served bundle is verified by the service, not here."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    probe = (manifest.get("probe") or {}).get("inputs") or []
    row = probe[0] if probe else [0.0] * int(manifest["input"]["shape"][-1])
    return manifest.get("bundle_version", "?"), row


def _named_example(spec: dict):
    """One row's value for a named input (Manifest.inputs): a string for text, zeros otherwise
    (dynamic dimensions taken as 1); images are better sent as a file (ready_lines says how)."""
    if spec.get("kind") == "text":
        return "some text to classify"
    zero = False if spec.get("dtype") == "bool" else 0
    value = zero
    for dim in reversed(list(spec.get("shape", ()))[1:]):
        value = [value] * (dim if isinstance(dim, int) else 1)
    return value


def example_body(bundle: Path) -> tuple[str, str, str]:
    """(bundle version, content type, curl data argument) of one example /predict request."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    version = manifest.get("bundle_version", "?")
    inputs = manifest.get("inputs") or []
    if len(inputs) == 1 and inputs[0].get("kind") == "image":
        return version, "image/png", "--data-binary @image.png"
    if inputs:
        named = {spec["name"]: [_named_example(spec)] for spec in inputs}
        body = {"inputs": next(iter(named.values()))} if len(inputs) == 1 else {"inputs": named}
        return version, "application/json", f"-d '{json.dumps(body, separators=(',', ':'))}'"
    _, row = example_row(bundle)
    body = {"inputs": [[int(v) if float(v).is_integer() else v for v in row]]}
    return version, "application/json", f"-d '{json.dumps(body, separators=(',', ':'))}'"


def ready_lines(url: str, bundle: Path, tokens: Tokens) -> list[str]:
    """What is printed once /readyz answers 200: the URL, and one curl that gets a prediction (naming
    FUSION_INFERENCE_TOKEN, never its value, when the service needs one)."""
    try:
        version, content_type, data = example_body(bundle)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):  # unreadable here: still ready
        version, content_type, data = "?", "application/json", """-d '{"inputs": [[...]]}'"""
    auth = ' -H "Authorization: Bearer $FUSION_INFERENCE_TOKEN"' if tokens.inference else ""
    return [
        f"{READY_PREFIX} {url} serves bundle {version} from {bundle} (dashboard: {url}/ui, API: README.md)",
        f"  curl -s -X POST {url}/predict -H 'Content-Type: {content_type}'{auth} {data}",
    ]


def is_ready(url: str, timeout: float = 1.0) -> bool:
    ctx = ssl._create_unverified_context() if url.startswith("https") else None  # our own server, on our own address
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=timeout, context=ctx) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):  # not listening yet, 503 while loading, a reset
        return False


def announce_when_ready(url: str, bundle: Path, tokens: Tokens, out=None, poll_s: float = POLL_S) -> None:
    """Poll /readyz until 200, then print the ready lines once. Runs until then (a daemon thread: it ends
    with the server if the server never gets ready)."""
    while not is_ready(url):
        time.sleep(poll_s)
    out = out or sys.stdout
    print("\n".join(ready_lines(url, bundle, tokens)), file=out, flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config.load()  # a bad setting stops here, before BentoML starts; the service reads them again
    except ConfigError as exc:  # one line naming the variable, not a traceback
        print(f"fusion-serve: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    threading.Thread(target=announce_when_ready, args=(address(argv, cfg.serve), Path(cfg.engine.bundle), cfg.tokens),
                     name="ready-line", daemon=True).start()
    from bentoml_cli.cli import cli  # what `python -m bentoml` runs

    cli(["serve", *argv], prog_name="bentoml")


if __name__ == "__main__":
    main()
