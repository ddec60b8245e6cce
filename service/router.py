"""Which variant answers a request: the live routing policy (A/B weights, shadows, cascade).

The policy is replaced as a whole (one reference assignment) by POST /admin/routing; a request reads
it once per decision. Changing it takes the bundle holder's install lock only (never its swap lock),
so it never waits on a load and is never checked against a version a swap is installing.
"""

from __future__ import annotations

import threading

from service.bundles import MEMBERS, Served
from service.routing import CASCADE, RoutingPolicy, unknown_variant


class Router:
    def __init__(self, policy: RoutingPolicy, install_lock: threading.Lock):
        self.policy: RoutingPolicy = policy
        self._install_lock = install_lock  # shared with BundleHolder: held by a swap for its install step only

    def choose(self, explicit: str | None, key: str | None, policy: RoutingPolicy | None = None) -> str:
        return explicit or (policy or self.policy).choose(key)

    def resolve(self, served: Served, variant: str | None, key: str | None,
                policy: RoutingPolicy | None = None) -> str:
        """The variant a request on `served` will use (fixed for the whole request), under `policy` (the
        one the request read once; the live one if None). An explicit variant that cannot answer is
        refused here, with every name that can. A variant the policy chose that `served` lacks (a policy
        installed for a newer version while this request holds the older one) falls back to `ensemble`."""
        policy = policy or self.policy
        if variant:
            self.check_variant(served, variant, policy)
            return variant
        name = policy.choose(key)
        if name not in served.names() and not (name == CASCADE and policy.cascade is not None):
            return "ensemble"
        return name

    def check_variant(self, served: Served, name: str, policy: RoutingPolicy | None = None) -> None:
        """Raise UnknownNameError unless `name` answers on `served` under `policy` (the live one if None);
        the error lists the variants and members, `members` when members mode runs, `cascade` when configured."""
        cascade = (policy or self.policy).cascade is not None
        valid = served.names() | ({CASCADE} if cascade else set())
        if name not in valid:
            unavailable = {} if served.members else {MEMBERS: "an 'ensemble' variant whose members are all in the bundle"}
            if not cascade:
                unavailable[CASCADE] = "a cascade configured (FUSION_CASCADE or POST /admin/routing)"
            raise unknown_variant(name, valid, unavailable)

    def check_against(self, served: Served) -> None:
        """ConfigError unless the live policy can run on `served` (a swap calls this under the install lock)."""
        self.policy.check_against(served.names())

    def set_policy(self, body: dict, current) -> RoutingPolicy:
        """Check and install a routing policy; `current()` gives the served version. Takes the install
        lock only: a swap holds it for its install step, not for its load, so this never waits seconds
        (issue 13, finding 5: it took the swap lock on the event loop and froze the worker for a whole
        load and warm-up)."""
        with self._install_lock:  # never checked against a bundle that a concurrent swap is installing
            policy = RoutingPolicy.from_dict(body, self.policy)
            policy.check_against(current().names())
            self.policy = policy  # one reference assignment: atomic for readers
        return policy
