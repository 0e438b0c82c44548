"""A real, throwaway PostgreSQL server for tests and benchmarks: initdb + pg_ctl in a temp dir on 127.0.0.1.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user (created if it is
missing) via `runuser`. Binaries are found on PATH or in Debian's /usr/lib/postgresql/<version>/bin.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "autopeft"
DB = "autopeft"


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for cand in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return cand
    return None


def available() -> str | None:
    """None when a server can be started here, else the reason it cannot."""
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if find_bin(b) is None]
    if missing:
        return f"PostgreSQL binaries not found ({', '.join(missing)}); `make test` installs them via apt as root"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as an unprivileged user"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    """`with TempPostgres() as pg: pg.url` -> postgresql+psycopg2://autopeft:<pw>@127.0.0.1:<port>/autopeft."""

    def __init__(self, max_connections: int = 200) -> None:
        self.password = "pw-" + secrets.token_hex(8)
        self.port = free_port()
        self.max_connections = max_connections
        self.dir = Path(tempfile.mkdtemp(prefix="autopeft-pg-"))
        self.data = self.dir / "data"
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{USER}:{self.password}@127.0.0.1:{self.port}/{DB}"

    def url_with(self, *, password: str | None = None, port: int | None = None, db: str | None = None) -> str:
        return (f"postgresql+psycopg2://{USER}:{password or self.password}@127.0.0.1:{port or self.port}/"
                f"{db or DB}")

    def _as_owner(self, cmd: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return cmd
        return ["runuser", "-u", "postgres", "--", *cmd]

    def _run(self, cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_owner(cmd), check=True, capture_output=True, text=True, **kw)

    def start(self) -> TempPostgres:
        if os.geteuid() == 0:
            if subprocess.run(["id", "-u", "postgres"], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            shutil.chown(self.dir, "postgres")
        pwfile = self.dir / "pw"
        pwfile.write_text("super-" + self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres")
        self._run([find_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections={self.max_connections}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run([find_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w",
                   "-t", "60", "start"])
        self.started = True
        psql = find_bin("psql")
        sql = (f"CREATE USER {USER} WITH PASSWORD '{self.password}';"
               f"CREATE DATABASE {DB} OWNER {USER};")
        for stmt in sql.split(";"):
            if stmt.strip():
                self._run([psql, "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                           "-v", "ON_ERROR_STOP=1", "-c", stmt])
        return self

    def create_database(self, name: str) -> str:
        self._run([find_bin("psql"), "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                   "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {name} OWNER {USER}"])
        return self.url_with(db=name)

    def stop(self) -> None:
        if self.started:
            subprocess.run(self._as_owner([find_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                           "stop"]), capture_output=True)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
