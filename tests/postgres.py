"""A throwaway PostgreSQL server for the tests, from Debian's package binaries: initdb into a temporary
directory, listening on 127.0.0.1 (a free port) and on a unix socket in that directory, fsync off.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user.

`find_bin()` says where the binaries are: $AMBER_POSTGRES_BIN (`make test` sets it, so CI cannot
skip these tests silently), else /usr/lib/postgresql/*/bin; None when neither has them.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def find_bin() -> Path | None:
    given = os.environ.get("AMBER_POSTGRES_BIN")
    if given:
        return Path(given)
    version = lambda path: tuple(int(n) for n in Path(path).parts[-3].split(".") if n.isdigit())
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    bin: Path
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        out = subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    def start(self) -> Server:
        if os.getuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off " \
                  "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")


def start(bin_dir: Path) -> Server:
    root = Path(tempfile.mkdtemp(prefix="amber-pg-"))
    root.chmod(0o700)
    return Server(bin_dir, root, _free_port()).start()


def remove(server: Server) -> None:
    shutil.rmtree(server.root, ignore_errors=True)
