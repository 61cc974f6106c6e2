"""A real PostgreSQL server for the tests: optc's search shares one Optuna study between workers
through PostgreSQL (`--storage postgresql://...`), so the tests that cover it need a real server.

The fixtures in conftest.py (`postgres_url` for the session, `postgres_db_url` for one test) get it:
1. from OPTC_TEST_POSTGRES_URL when it is set: a SQLAlchemy URL such as
   postgresql+psycopg2://postgres@127.0.0.1:PORT/optc_test, whose user may create databases
   (`.ci/run` sets it from `eval "$(bash .ci/postgres.sh start)"`);
2. otherwise, when the PostgreSQL server binaries are on this machine (/usr/lib/postgresql/*/bin or
   PATH), from a throwaway server that `.ci/postgres.sh start` starts for the test session and
   `.ci/postgres.sh stop` removes at its end;
3. otherwise the tests that need one skip, or fail when OPTC_REQUIRE_POSTGRES=1 (`.ci/run` sets it).
"""

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"

HOW_TO = ("start one with `eval \"$(bash .ci/postgres.sh start)\"`, which exports OPTC_TEST_POSTGRES_URL "
          "(`bash .ci/postgres.sh stop` removes it), or install the server (`bash .ci/postgres.sh install`, "
          "or `apt-get install postgresql`) and the tests start their own")


def unavailable(reason):
    """Skip the test, or fail it when OPTC_REQUIRE_POSTGRES=1."""
    if os.environ.get("OPTC_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason}; OPTC_REQUIRE_POSTGRES=1 requires a PostgreSQL server: {HOW_TO}", pytrace=False)
    pytest.skip(f"{reason}: {HOW_TO}")


def _script(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=180)


def binaries_found():
    return _script("bindir").returncode == 0


def start_server():
    """Start a throwaway server with `.ci/postgres.sh start`; returns (its temp dir, its URL)."""
    proc = _script("start")
    if proc.returncode != 0:
        raise RuntimeError(f"`bash {SCRIPT} start` failed with exit status {proc.returncode}:\n{proc.stderr}")
    env = dict(re.findall(r"^export (\w+)=(\S+)$", proc.stdout, re.M))
    return env["OPTC_TEST_POSTGRES_DIR"], env["OPTC_TEST_POSTGRES_URL"]


def stop_server(directory):
    proc = _script("stop", directory)
    if proc.returncode != 0:
        raise RuntimeError(f"`bash {SCRIPT} stop {directory}` failed with exit status {proc.returncode}:\n{proc.stderr}")


def _admin_engine(url):
    import sqlalchemy

    return sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool,
                                    connect_args={"connect_timeout": 10})


def server_version(url):
    """Connect to the server at `url`; returns its version string."""
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT version()").scalar()
    finally:
        engine.dispose()


def database_name(test_name):
    """A unique, valid database name (at most 63 bytes) that says which test it belongs to."""
    stem = re.sub(r"[^a-z0-9]+", "_", test_name.lower()).strip("_")[:40]
    return f"optc_t_{stem}_{uuid.uuid4().hex[:10]}"


def create_database(url, name):
    """Create the empty database `name` on the server at `url`; returns the URL of the new database."""
    from sqlalchemy.engine import make_url

    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url, name):
    """Drop the database `name`, ending any connections to it that a test left open."""
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.server_version_info >= (13,):
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = %(name)s AND pid <> pg_backend_pid()", {"name": name})
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        engine.dispose()


def session_server():
    """Generator for the session fixture: yields the server's URL, and stops a server it started."""
    try:
        import psycopg2  # noqa: F401  (the driver optuna's RDBStorage uses for postgresql:// URLs)
        import sqlalchemy  # noqa: F401
    except ImportError as e:
        unavailable(f"{e.name} is not installed (.venv/bin/python -m pip install -r requirements.txt)")

    url = os.environ.get("OPTC_TEST_POSTGRES_URL")
    if url:
        try:
            server_version(url)
        except Exception as e:  # a server that was named but cannot be reached is an error, not a skip
            pytest.fail(f"OPTC_TEST_POSTGRES_URL={url} cannot be reached: {e}", pytrace=False)
        yield url
        return

    if not binaries_found():
        unavailable("no PostgreSQL server: OPTC_TEST_POSTGRES_URL is not set, and no server binaries were "
                    "found in /usr/lib/postgresql/*/bin or on PATH")
    directory, url = start_server()
    try:
        server_version(url)
        yield url
    finally:
        stop_server(directory)
