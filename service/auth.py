"""Optional bearer tokens: one for inference, one for admin (FUSION_INFERENCE_TOKEN, FUSION_ADMIN_TOKEN),
and the rules that keep the admin endpoints away from web pages and proxies.

No token configured for a scope means the scope is open. Health endpoints are always open.
Tokens are compared in constant time and never logged.

Admin without FUSION_ADMIN_TOKEN ("loopback trust", for a local `make serve`) is granted only to a
request that a web page or a proxy cannot have made (issue 13, finding 4):

* the socket peer is a loopback address, and no proxy header (Forwarded, X-Forwarded-For,
  X-Forwarded-Host, X-Real-IP, Via) is present: a same-host proxy connects from loopback for
  every client it forwards;
* the `Host` header names a loopback host (localhost, 127.0.0.0/8, [::1], any port) or one in
  FUSION_ALLOWED_HOSTS: a DNS-rebinding page reaches 127.0.0.1 under its own name, and the browser
  sends that name;
* FUSION_ADMIN_LOOPBACK is not 0 (every file in deploy/ sets 0: admin is token-only there; a
  `kubectl port-forward` or a sidecar also connects from loopback and adds no header).

With or without a token, an admin request that carries an `Origin` other than the server's own or
one in FUSION_ALLOWED_ORIGINS is refused: browsers send `Origin` on cross-origin POSTs, so this
stops a page from driving admin even where some other credential would let it through. With a
token, `Host` is checked only when FUSION_ALLOWED_HOSTS is set (behind an ingress the Host is a
real hostname; rebinding cannot forge the token).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from typing import Mapping

from service.errors import AuthError

# headers a forwarding proxy adds; a request carrying one did not come from a local client directly
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip", "via")
_HOST = re.compile(r"^(\[[0-9a-f:.]+\]|[^\[\]:/@\s]+)(?::(\d{1,5}))?$")  # name or [v6], optional :port


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def split_host(value: str) -> tuple[str, str] | None:
    """A Host header as (name, port) lower-cased, brackets of an IPv6 literal removed; None if malformed."""
    m = _HOST.match(value.strip().lower())
    if not m:
        return None
    return m.group(1).strip("[]"), m.group(2) or ""


@dataclass(frozen=True)
class Tokens:
    inference: str = ""
    admin: str = ""
    admin_loopback: bool = True  # FUSION_ADMIN_LOOPBACK: without an admin token, admin answers local clients
    allowed_hosts: frozenset[str] = frozenset()  # FUSION_ALLOWED_HOSTS: "name" (any port) or "name:port"
    allowed_origins: frozenset[str] = frozenset()  # FUSION_ALLOWED_ORIGINS: "https://ops.example"

    def check(self, authorization: str | None, scope: str, client_host: str | None = None,
              headers: Mapping[str, str] | None = None) -> None:
        """scope "inference": the inference or the admin token; scope "admin": the admin token only.

        Without an admin token, admin endpoints answer direct loopback clients only (the module's
        docstring), never the network: an open admin endpoint could reroute traffic or load bundles.
        `headers` are the request's, looked up by lower-case name (Starlette's Headers or a dict).
        """
        headers = headers if headers is not None else {}
        if scope == "admin":
            self._check_origin(headers)
        needed = [t for t in ((self.inference, self.admin) if scope == "inference" else (self.admin,)) if t]
        if scope == "inference" and not self.inference:
            return  # inference is open unless its own token is set
        if scope == "admin" and not self.admin:
            self._check_loopback_trust(client_host, headers)
            return
        if scope == "admin" and self.allowed_hosts:
            self._check_host(headers)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AuthError(f"this endpoint needs 'Authorization: Bearer <{scope} token>'; got none", 401)
        if any(hmac.compare_digest(given.encode(), t.encode()) for t in needed):
            return
        if scope == "admin" and self.inference and hmac.compare_digest(given.encode(), self.inference.encode()):
            raise AuthError("the inference token is not allowed on admin endpoints; use the admin token", 403)
        raise AuthError(f"wrong bearer token for this {scope} endpoint", 401)

    # ---- admin rules ---------------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        parts = split_host(host)
        if parts is None:
            return False
        name, port = parts
        if name == "localhost" or is_loopback(name):
            return True
        return name in self.allowed_hosts or (bool(port) and f"{name}:{port}" in self.allowed_hosts)

    def _check_host(self, headers: Mapping[str, str]) -> None:
        host = headers.get("host")  # absent only from HTTP/1.0 clients, never from a browser's request
        if host is not None and not self.host_allowed(host):
            raise AuthError(f"admin endpoints expect a Host of localhost, 127.0.0.1 or [::1] (any port) or one in "
                            f"FUSION_ALLOWED_HOSTS; got Host '{host:.100}' (a DNS-rebinding page sends its own name)", 403)

    def _check_origin(self, headers: Mapping[str, str]) -> None:
        origin = headers.get("origin")
        if origin is None:
            return
        o, host = origin.strip().lower().rstrip("/"), (headers.get("host") or "").strip().lower()
        if o in self.allowed_origins or (host and o in (f"http://{host}", f"https://{host}")):
            return
        raise AuthError(f"admin endpoints refuse requests from web pages of other origins; got Origin '{origin:.100}', "
                        "expected none, the server's own, or one in FUSION_ALLOWED_ORIGINS", 403)

    def _check_loopback_trust(self, client_host: str | None, headers: Mapping[str, str]) -> None:
        if not self.admin_loopback:
            raise AuthError("admin endpoints are token-only here (FUSION_ADMIN_LOOPBACK=0) and FUSION_ADMIN_TOKEN "
                            "is not set: set it and send 'Authorization: Bearer <admin token>'", 403)
        proxied = [h for h in PROXY_HEADERS if h in headers]
        if not is_loopback(client_host):
            via = (f"; this request came through a proxy ({', '.join(proxied)} header), so its client is the one the "
                   "proxy names, not this machine" if proxied else "")
            raise AuthError(f"admin endpoints answer only loopback clients unless FUSION_ADMIN_TOKEN is set{via}", 403)
        if proxied:
            raise AuthError(f"admin without FUSION_ADMIN_TOKEN answers only direct local clients; this request came "
                            f"through a proxy ({', '.join(proxied)} header): set FUSION_ADMIN_TOKEN to use admin "
                            "through a proxy", 403)
        self._check_host(headers)
