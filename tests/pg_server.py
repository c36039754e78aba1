"""A throwaway PostgreSQL server for the test session, and a fresh database per test.

`$FLOWSDK_TEST_POSTGRES` (a server URL such as `postgresql://postgres@127.0.0.1:5432/postgres`,
whose role may create databases) is used when set. Otherwise the first test
that needs PostgreSQL starts one cluster (`initdb` + `pg_ctl start` in a
temporary folder, on a free port, as the unprivileged `postgres` user when
running as root) and the session stops it and removes its folder at the end;
each pytest-xdist worker is a session, with a server of its own. A watchdog
process stops a server this session started, and removes its folder, once the
session's process is gone, however it ended (SIGTERM and SIGKILL included, which
skip the session's own teardown). When the server
binaries are missing, PostgreSQL tests skip and say why
(`scripts/ensure-postgres.sh`, run by `make test`, installs them when it can).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit, urlunsplit

import psycopg

__all__ = ["PostgresServer", "find_binaries"]

# Waits for the end of its standard input, which the test process holds open
# until it has stopped the server itself, or until it dies: the kernel closes it
# then. Then stops the server (argv), if still running, and removes its folder.
WATCHDOG = """
import shutil, subprocess, sys
sys.stdin.buffer.read()
subprocess.run(sys.argv[2:], capture_output=True, timeout=120, check=False, cwd="/")
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def find_binaries() -> str | None:
    """Return the folder holding `initdb` and `pg_ctl`, newest version first, or None."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    found = shutil.which("pg_ctl")
    return os.path.dirname(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL server: started here (and stopped by `stop`) or found at a URL."""

    def __init__(self) -> None:
        self._folder: str | None = None
        self._options = ""
        self._user: str | None = None
        self._bin: str | None = None
        given = os.environ.get("FLOWSDK_TEST_POSTGRES")
        if given:
            self.admin_url = given
            return
        binaries = find_binaries()
        if binaries is None:
            raise FileNotFoundError(
                "no PostgreSQL server binaries (initdb, pg_ctl): run scripts/ensure-postgres.sh "
                "(as root it installs Debian's postgresql package) or set FLOWSDK_TEST_POSTGRES"
            )
        self._bin = binaries
        self._folder = tempfile.mkdtemp(prefix="flowsdk-pg-")
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            owner = pwd.getpwnam(self._user)
            os.chown(self._folder, owner.pw_uid, owner.pw_gid)
        data = os.path.join(self._folder, "data")
        self.port = _free_port()
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        self._options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self._folder} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        log = os.path.join(self._folder, "server.log")
        stop = self._argv("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        # Its own session: a signal to the test run's process group leaves it alone.
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, self._folder, *stop],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._run("pg_ctl", "-D", data, "-l", log, "-o", self._options, "-w", "-t", "60", "start")
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _argv(self, tool: str, *args: str) -> list[str]:
        assert self._bin is not None
        argv = [os.path.join(self._bin, tool), *args]
        if self._user is not None:
            argv = ["runuser", "-u", self._user, "--", *argv]
        return argv

    def _run(self, tool: str, *args: str) -> None:
        argv = self._argv(tool, *args)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def restart(self) -> None:
        """Stop the server (fast: sessions are cut) and start it again."""
        assert self._folder is not None, "restart needs a server started by the tests"
        data = os.path.join(self._folder, "data")
        self._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        self.start_again()

    def stop_only(self) -> None:
        """Stop the server (fast); `start_again` brings it back."""
        assert self._folder is not None, "stop_only needs a server started by the tests"
        self._run("pg_ctl", "-D", os.path.join(self._folder, "data"), "-m", "fast", "-w", "stop")

    def start_again(self) -> None:
        """Start the server stopped by `stop_only`, on the same port."""
        assert self._folder is not None
        data = os.path.join(self._folder, "data")
        log = os.path.join(self._folder, "server.log")
        self._run("pg_ctl", "-D", data, "-l", log, "-o", self._options, "-w", "-t", "60", "start")

    @property
    def owned(self) -> bool:
        """Whether this session started the server (so it may stop and restart it)."""
        return self._folder is not None

    def new_database(self) -> str:
        """Create an empty database; return its URL."""
        name = f"flowsdk_{secrets.token_hex(6)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))

    def stop(self) -> None:
        """Stop a server this session started and remove its folder."""
        if self._folder is None:
            return
        data = os.path.join(self._folder, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            self._run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None
        watchdog = self._watchdog
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # nothing left for it to stop: it ends
        watchdog.wait(timeout=120)
