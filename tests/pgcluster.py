"""A throwaway PostgreSQL server for the tests and bench/bench_store.py: `initdb` + `pg_ctl` in a temporary folder,
listening on a free loopback port (and a unix socket in that folder), trust authentication for its one superuser
`dxagent`. As root (CI, this machine) the server runs as the `postgres` user (Debian's package makes it), else as
`nobody`: PostgreSQL refuses to run as root.

`PgCluster.why_not()` says in one line why none can be started here (no server binaries, no driver), for a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

INSTALL_HINT = "scripts/install.sh installs Debian's postgresql package and the [postgres] extra"


def _bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest Debian /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(found):
        return Path(found[0]).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3])
                      if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self, durable: bool = False):
        """durable=False (the tests): fsync off, as a throwaway server may; True (the benchmark): the defaults."""
        self.bin = _bin_dir()
        self.durable = durable
        self.dir: Path | None = None
        self.port = 0
        self.user: str | None = None

    @staticmethod
    def why_not() -> str | None:
        if _bin_dir() is None:
            return f"no PostgreSQL server here (initdb and pg_ctl not found; {INSTALL_HINT})"
        try:
            import langgraph.checkpoint.postgres  # noqa: F401
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as exc:
            return f"{exc.name} is not installed (pip install 'dxagent[postgres]'; {INSTALL_HINT})"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "running as root without runuser: PostgreSQL cannot be started as root"
        return None

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        full = list(cmd) if self.user is None else ["runuser", "-u", self.user, "--", *cmd]
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd="/")
        if r.returncode != 0:
            log = (self.dir / "server.log").read_text()[-2000:] if self.dir and (self.dir / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {r.stderr.strip() or r.stdout.strip()}\n{log}")
        return r

    def start(self) -> PgCluster:
        assert self.bin is not None, self.why_not()
        self.dir = Path(tempfile.mkdtemp(prefix="dxagent-pg-"))
        if os.geteuid() == 0:
            self.user = "postgres" if _has_user("postgres") else "nobody"
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "dxagent", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        self.start_server()
        return self

    def start_server(self) -> None:
        """Start (or start again, on the same port) the server of an initialised cluster."""
        self.port = self.port or _free_port()
        opts = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.dir}", "-c max_connections=200"]
        if not self.durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w",
                  "-t", "30", "-o", " ".join(opts), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` ends the sessions (rolled back) and shuts down cleanly, `immediate` as if killed."""
        if self.dir is not None and (self.dir / "data" / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://dxagent@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database: its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
