"""Every setting of the service, read once from the environment and passed down.

The only module under service/ that reads os.environ (issue 14): the service's construction calls
`load()` once and hands each part to the object that needs it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    bundle: str = "artifacts/bundle"
    failure_policy: str = "strict"
    member_deadline_ms: float = 1000.0
    shadow_queue: int = 64  # shadow runs waiting beyond this are dropped (and counted), never queued forever
    batch_max_rows: int = 0  # adaptive batching of concurrent requests per model; 0 = off
    batch_instances: int = 2  # calls of one model the batcher may run at once (Triton: model instances)
    bundle_root: str = ""  # hot swaps load bundles below this directory only; "" = the served bundle's parent

    @classmethod
    def from_env(cls, env=os.environ) -> "EngineConfig":
        return cls(
            bundle=env.get("FUSION_BUNDLE", cls.bundle),
            failure_policy=env.get("FUSION_FAILURE_POLICY", cls.failure_policy),
            member_deadline_ms=float(env.get("FUSION_MEMBER_DEADLINE_MS", cls.member_deadline_ms)),
            shadow_queue=int(env.get("FUSION_SHADOW_QUEUE", cls.shadow_queue)),
            bundle_root=env.get("FUSION_BUNDLE_ROOT", ""),
        )

    def root(self) -> Path:
        """The directory hot swaps are confined to, links resolved: FUSION_BUNDLE_ROOT, or by default
        the directory that holds the served bundle (its versions' siblings), never "anywhere". A
        world-writable parent (a bundle served from /tmp) is no confinement: then only the bundle's
        own directory, until FUSION_BUNDLE_ROOT says otherwise."""
        if self.bundle_root:
            return Path(self.bundle_root).resolve()
        parent = Path(self.bundle).absolute().parent.resolve()
        try:
            shared = parent.stat().st_mode & stat.S_IWOTH
        except OSError:  # no such directory yet: nothing can be swapped in from it either
            shared = False
        return Path(self.bundle).resolve() if shared else parent
