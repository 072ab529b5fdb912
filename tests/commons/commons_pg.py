"""A throwaway PostgreSQL server for the commons' tests and benchmark.

    with throwaway_postgres() as server_url:        # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
        url = fresh_database(server_url)             # a new empty database on it

initdb into a temp folder, pg_ctl start on a free loopback port with the socket in that folder, and
stop + delete afterwards. As root, the server runs as the `postgres` system user (or `nobody`). With
POTLUCK_TEST_POSTGRES_URL set, that server is used instead and nothing is started.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

ENV = "POTLUCK_TEST_POSTGRES_URL"


class PostgresMissing(RuntimeError):
    pass


def postgres_bin() -> Path:
    """The folder with initdb and pg_ctl; PostgresMissing with what to do when there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [str(Path(found).parent) for found in [shutil.which("initdb")] if found]
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    raise PostgresMissing("PostgreSQL server binaries (initdb, pg_ctl) are not installed: run "
                          "`bash scripts/system-deps.sh` (as `make test` does), or set "
                          f"{ENV}=postgresql://user@host:port/db to use a running server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runner() -> tuple[list[str], str | None]:
    """(command prefix, user) to run the server as: postgres refuses to run as root."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"], user
    raise PostgresMissing("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


@contextlib.contextmanager
def throwaway_postgres(*, durable: bool = False) -> Iterator[str]:
    """Start a private PostgreSQL server and yield its URL (the `postgres` database, user `postgres`).

    `durable=False` turns fsync off (tests); the benchmark passes True to measure the real thing.
    """
    if os.environ.get(ENV):
        yield os.environ[ENV]
        return
    bin_dir = postgres_bin()
    prefix, user = _runner()
    tmp = Path(tempfile.mkdtemp(prefix="potluck-pg-", dir="/tmp"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(tmp, entry.pw_uid, entry.pw_gid)
    data, port = tmp / "data", free_port()
    run = dict(check=True, capture_output=True, text=True, cwd=tmp)
    options = f"-k {tmp} -p {port} -h 127.0.0.1"
    if not durable:
        options += " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
    options += " -c max_connections=200"
    try:
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"], **run)
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                        str(tmp / "server.log"), "-w", "-t", "60", "start"], **run)
    except subprocess.CalledProcessError as err:
        log = (tmp / "server.log").read_text() if (tmp / "server.log").exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {err.stderr or err.stdout}\n{log}") from None
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, cwd=tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server at `server_url`; its URL.

    Where the role may not create databases (a given POTLUCK_TEST_POSTGRES_URL), the given database is
    emptied instead.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from potluck.commons.models import Base
    from potluck.commons.registry import normalize_url

    url = make_url(normalize_url(server_url))
    name = f"potluck_{uuid.uuid4().hex[:12]}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        return url.set(database=name).render_as_string(hide_password=False)
    except Exception:
        Base.metadata.drop_all(engine)
        return url.render_as_string(hide_password=False)
    finally:
        engine.dispose()


def drop_database(url: str) -> None:
    """Drop a database made by `fresh_database` (forcing out connections left open); errors are ignored."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(url)
    if not url.database or not url.database.startswith("potluck_"):
        return  # the given database itself: leave it
    engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    except Exception:
        pass
    finally:
        engine.dispose()
