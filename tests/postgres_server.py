"""A throwaway PostgreSQL server for the ledger tests, built on the distribution's binaries.

No third-party test plugin: initdb + pg_ctl in a temporary directory, owned by
an unprivileged account when we run as root (initdb and postgres refuse uid 0).

    with TempPostgres() as pg:
        pg.dsn            # 'postgresql://postgres@127.0.0.1:PORT/postgres'
        pg.socket_dsn()   # same server via the Unix socket in the temp dir

Binaries are found via $PG_BINDIR, then `pg_config --bindir` on PATH, then the
newest /usr/lib/postgresql/*/bin (Debian/Ubuntu layout), then initdb on PATH
(Homebrew, Fedora, conda).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """Raised when no usable server binaries / account are found."""


def find_pg_bindir() -> Path:
    env = os.environ.get("PG_BINDIR")
    if env:
        p = Path(env)
        if (p / "initdb").exists():
            return p
        raise PostgresUnavailable(f"PG_BINDIR={env} has no initdb")
    pgc = shutil.which("pg_config")
    if pgc:
        out = subprocess.run([pgc, "--bindir"], capture_output=True, text=True)
        p = Path(out.stdout.strip())
        if out.returncode == 0 and (p / "initdb").exists():
            return p
    cands = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda s: int(Path(s).parent.parent.name) if Path(s).parent.parent.name.isdigit() else 0,
    )
    if cands:
        return Path(cands[-1]).parent
    w = shutil.which("initdb")
    if w:
        return Path(w).parent
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (apt-get install postgresql / set PG_BINDIR)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    def __init__(self, bindir: Path | None = None, run_as: str | None = None):
        self.bindir = Path(bindir) if bindir else find_pg_bindir()
        self.run_as = run_as
        if self.run_as is None and os.geteuid() == 0:
            self.run_as = os.environ.get("PG_TEST_OS_USER", "postgres")
        self._pw = None
        if self.run_as is not None:
            try:
                self._pw = pwd.getpwnam(self.run_as)
            except KeyError as e:
                raise PostgresUnavailable(
                    f"running as root but OS user {self.run_as!r} does not exist") from e
        self.base: Path | None = None
        self.port: int | None = None
        self.timings: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------
    def _run(self, args, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", str(self.base))  # /root is not readable by postgres
        if self._pw is not None:
            # Python >= 3.9: subprocess drops privileges itself (setgid/setgroups/setuid)
            kw.update(user=self._pw.pw_uid, group=self._pw.pw_gid, extra_groups=[])
            env = dict(os.environ, HOME=self._pw.pw_dir, USER=self.run_as, LOGNAME=self.run_as)
            kw["env"] = env
        r = subprocess.run([str(a) for a in args], **kw)
        if r.returncode != 0:
            log = ""
            if self.base and (self.base / "server.log").exists():
                log = (self.base / "server.log").read_text()[-4000:]
            raise RuntimeError(f"{args[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{log}")
        return r

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def socket_dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.sockdir}&port={self.port}"

    # -- lifecycle -------------------------------------------------------
    def start(self, attempts: int = 3) -> "TempPostgres":
        t0 = time.perf_counter()
        self.base = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.sockdir.mkdir()
        if self._pw is not None:
            os.chown(self.base, self._pw.pw_uid, self._pw.pw_gid)
            os.chown(self.sockdir, self._pw.pw_uid, self._pw.pw_gid)
        # -N (--no-sync): do not fsync the new cluster; fine for throwaway data
        self._run([self.bindir / "initdb", "-D", self.datadir, "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--locale=C", "-N"])
        t1 = time.perf_counter()
        opts = ("-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=100 "
                f"-k {self.sockdir}")
        last = None
        for _ in range(attempts):  # a free port may be taken between probe and bind
            self.port = _free_port()
            try:
                self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.base / "server.log",
                           "-w", "-t", "30", "-o", f"{opts} -p {self.port}", "start"])
                break
            except RuntimeError as e:
                last = e
        else:
            self.stop()
            raise last
        t2 = time.perf_counter()
        self.timings.update(initdb=t1 - t0, pg_ctl_start=t2 - t1)
        return self

    def stop(self) -> None:
        if self.base is None:
            return
        t0 = time.perf_counter()
        if (self.datadir / "postmaster.pid").exists():
            try:
                # 'fast' = roll back clients and shut down cleanly; 'immediate' is quicker still
                self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop"])
            except RuntimeError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
        self.timings["stop_and_cleanup"] = time.perf_counter() - t0
        self.base = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
