"""A throwaway PostgreSQL for tests: `initdb` + `pg_ctl` in a temporary directory, on a free loopback
port, stopped (and deleted) at the end. The binaries come from PATH or Debian's
/usr/lib/postgresql/<major>/bin (`make test` installs the `postgresql` package when they are missing)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.server import free_port


def pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(found):
        return Path(found[0]).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    return None


class Postgres:
    """`pg = Postgres().start(); pg.url ...; pg.stop(); pg.start(); pg.close()` (a stop keeps the data)."""

    def __init__(self):
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl): install Debian's postgresql (make test does)")
        self.dir = Path(tempfile.mkdtemp(prefix="fusion-pg-"))
        self.data, self.log = self.dir / "data", self.dir / "pg.log"
        # PostgreSQL refuses to run as root: as root (CI containers), run it as the `postgres` user (Debian's
        # package makes it) or `nobody`, owning the temporary directory
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.user is None:
                raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.port = free_port()
        self.url = f"postgresql://fusion@127.0.0.1:{self.port}/postgres"
        env = {**os.environ, "LC_ALL": "C"}
        out = subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "fusion", "--auth=trust",
                              "--no-sync", "-E", "UTF8"], capture_output=True, text=True, env=env, timeout=120,
                             cwd=self.dir, **self._as())
        if out.returncode:
            raise RuntimeError(f"initdb failed (rc {out.returncode}): {out.stderr[-2000:]}")

    def _as(self) -> dict:
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}

    def _ctl(self, *args: str) -> None:
        out = subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args],
                             capture_output=True, text=True, timeout=120, cwd=self.dir, **self._as())
        if out.returncode:
            raise RuntimeError(f"pg_ctl {args[0]} failed (rc {out.returncode}): {out.stderr[-1000:]}\n"
                               f"{self.log.read_text()[-2000:] if self.log.exists() else ''}")

    def start(self) -> "Postgres":
        # the socket in our own directory (not /var/run/postgresql, which may not exist or be writable)
        self._ctl("start", "-w", "-o", f"-p {self.port} -k {self.dir} -h 127.0.0.1 -c fsync=off -c max_connections=60")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-m", mode)

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
