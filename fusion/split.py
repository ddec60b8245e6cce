"""`fusion build --split` / `fusion split`: one bundle per member plus a front bundle whose members are
remote (issue 19), so the same recipe serves in one process or as one server per member.

    OUT/front/            the front: the ensemble's combiner, its members as `remote` URLs (no files),
                          the other variants (merged, distilled, int8) as local files, the probe rows
    OUT/members/NAME/     one bundle per member: that member's file and its probe outputs
    OUT/split.json        the layout: each member's bundle directory, service host and URL

Torch-free: it reads a built bundle (every digest checked) and writes the new ones with BundleWriter, so
each gets its own content-addressed version. A member server serves its bundle with
`FUSION_AB_WEIGHTS=NAME=1` (its only model); the front finds a member at the manifest's URL (by default
`http://member-<host>:3000/v2/models/<name>`, <host> the name as a DNS label: the Service of
deploy/overlays/split and the service of deploy/compose-split.yaml) unless FUSION_MEMBER_URL_<NAME> says
otherwise (service/remote.py).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from fusion.bundle import BundleWriter, read_bundle
from fusion.errors import ConfigError

DEFAULT_URL_TEMPLATE = "http://member-{host}:3000/v2/models/{name}"
LAYOUT = "split.json"


def member_host(name: str) -> str:
    """A member name as a DNS-1035 label (a Kubernetes Service or compose service name suffix)."""
    host = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    host = re.sub(r"^[^a-z]+", "", host)[:50].rstrip("-")
    if not host:
        raise ConfigError(f"member '{name}': expected a name with at least one letter (it names a service host)")
    return host


def member_urls(url_template: str, hosts: dict[str, str]) -> dict[str, str]:
    """Each member's URL from the template; a ConfigError unless every one is a URL of the form the front accepts
    (service/remote.member_url: http(s)://HOST[:PORT][/PREFIX]/v2/models/NAME)."""
    want = "an http(s)://HOST:PORT/v2/models/{name} template with no other fields than {name} and {host}"
    try:
        urls = {n: url_template.format(name=n, host=h) for n, h in hosts.items()}
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(f"url template: expected {want}; got {url_template!r:.120} ({type(exc).__name__}: {exc})") from None
    for url in urls.values():
        parts = urlsplit(url)
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
                or not re.fullmatch(r"(/[^?#]*)?/v2/models/[^/]+(/versions/[^/]+)?", parts.path)):
            raise ConfigError(f"url template: expected {want}; got {url_template!r:.120} (giving {url!r:.120})")
    return urls


def split_bundle(src: str | Path, out: str | Path, url_template: str = DEFAULT_URL_TEMPLATE) -> dict:
    """Write OUT/front, OUT/members/NAME for every ensemble member of the bundle at `src`, and OUT/split.json;
    returns the layout (what split.json holds)."""
    bundle = read_bundle(src, check_version=True)
    m = bundle.manifest
    ens = m.variants.get("ensemble")
    if ens is None or not ens.members:
        raise ConfigError(f"{src}: expected a bundle with an 'ensemble' variant and its members; it has {sorted(m.variants)}")
    if m.inputs:
        raise ConfigError(f"{src}: split serving sends the flat feature input; this bundle has named inputs "
                          f"{[t.name for t in m.inputs]} (serve it in one process)")
    missing = [n for n in ens.members if n not in m.members]
    if missing:
        raise ConfigError(f"{src}: the ensemble's members {missing} have no file in the bundle; expected all of them")
    hosts = {n: member_host(n) for n in ens.members}
    if len(set(hosts.values())) != len(hosts):
        raise ConfigError(f"members {sorted(hosts)} map to clashing host names {sorted(hosts.values())}; rename them")
    urls = member_urls(url_template, hosts)  # checked before anything is written
    out = Path(out)
    probe = m.probe or {}
    layout = {"source_version": m.bundle_version, "front": "front", "members": {}}
    for name in ens.members:
        entry = m.members[name]
        rel = f"members/{member_host(name)}"
        with BundleWriter(out / rel) as w:
            (w.stage / entry.file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.file(name), w.stage / entry.file)
            own_probe = ({"inputs": probe["inputs"], "outputs": {name: probe["outputs"][name]}}
                         if name in probe.get("outputs", {}) else None)
            written = w.commit(replace(m, bundle_version="", created="", variants={}, members={name: entry},
                                       probe=own_probe, comparison=None, ensemble_selection=None))
        url = urls[name]
        layout["members"][name] = {"bundle": rel, "host": f"member-{hosts[name]}", "url": url,
                                   "bundle_version": written.bundle_version}
    remote = {n: replace(m.members[n], file="", sha256="", remote=layout["members"][n]["url"], output="probabilities",
                         output_name="", input_map={}) for n in ens.members}
    local = {k: e for k, e in m.variants.items() if k != "ensemble"}
    with BundleWriter(out / "front") as w:
        for e in local.values():
            (w.stage / e.file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / e.file, w.stage / e.file)
        front = w.commit(replace(m, bundle_version="", created="", variants={"ensemble": replace(ens, file="", sha256=""), **local},
                                 members=remote, comparison=None))
    layout["front_version"] = front.bundle_version
    (out / LAYOUT).write_text(json.dumps(layout, indent=2))
    return layout
