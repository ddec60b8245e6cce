"""Optional bearer tokens: one for inference, one for admin (FUSION_INFERENCE_TOKEN, FUSION_ADMIN_TOKEN).

No token configured for a scope means the scope is open. Health endpoints are always open.
Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from service.errors import AuthError


def is_loopback(host: str | None) -> bool:
    import ipaddress

    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class Tokens:
    inference: str = ""
    admin: str = ""

    @classmethod
    def from_env(cls, env=os.environ) -> "Tokens":
        return cls(env.get("FUSION_INFERENCE_TOKEN", ""), env.get("FUSION_ADMIN_TOKEN", ""))

    def check(self, authorization: str | None, scope: str, client_host: str | None = None) -> None:
        """scope "inference": the inference or the admin token; scope "admin": the admin token only.

        Without an admin token, admin endpoints answer loopback clients only (a local `make serve`),
        never the network: an open admin endpoint could load bundles from anywhere on the server.
        """
        needed = [t for t in ((self.inference, self.admin) if scope == "inference" else (self.admin,)) if t]
        if scope == "inference" and not self.inference:
            return  # inference is open unless its own token is set
        if scope == "admin" and not self.admin:
            if is_loopback(client_host):
                return
            raise AuthError("admin endpoints answer only loopback clients unless FUSION_ADMIN_TOKEN is set", 403)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AuthError(f"this endpoint needs 'Authorization: Bearer <{scope} token>'; got none", 401)
        if any(hmac.compare_digest(given.encode(), t.encode()) for t in needed):
            return
        if scope == "admin" and self.inference and hmac.compare_digest(given.encode(), self.inference.encode()):
            raise AuthError("the inference token is not allowed on admin endpoints; use the admin token", 403)
        raise AuthError(f"wrong bearer token for this {scope} endpoint", 401)
