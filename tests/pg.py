"""PostgreSQL for the tests: a fresh database per test (``CREATE DATABASE`` with a unique name,
dropped after), on the server at :data:`ADMIN_URL`.

``.ci/run`` makes sure PostgreSQL is up (``scripts/ci_services.sh``), so in CI (``CI`` set) a
server that cannot be reached fails the test; on a developer machine without PostgreSQL the
tests that need it are skipped, saying why.
"""
from __future__ import annotations

import asyncio
import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

#: the maintenance database the test databases are created from (trust auth on this machine)
ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def url_for(dbname: str) -> str:
    """:data:`ADMIN_URL` with its database replaced by ``dbname``."""
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def reachable(timeout_s: int = 3) -> str | None:
    """``None`` when PostgreSQL answers at :data:`ADMIN_URL`, else why not."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=timeout_s) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {exc}".strip()


def require_postgres() -> None:
    """Skip (on a developer machine) or fail (in CI: ``CI`` set) when PostgreSQL is down."""
    why = reachable()
    if why is None:
        return
    message = f"PostgreSQL at {ADMIN_URL} is not reachable ({why})"
    if os.environ.get("CI"):
        pytest.fail(message + "; .ci/run should have started it")
    pytest.skip(message)


def create_database(prefix: str = "colmap_test") -> str:
    """A new empty database with a unique name; its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name made here, never by a client
    return name


def drop_database(name: str) -> None:
    """Drop ``name``, ending the sessions still connected to it."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def terminate_sessions(name: str) -> int:
    """``pg_terminate_backend`` every session connected to database ``name``; how many."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", [name]).fetchall()
    return sum(1 for (ok,) in rows if ok)


def allow_connections(name: str, allow: bool) -> None:
    """Let new sessions into database ``name`` or refuse them (``ALLOW_CONNECTIONS``): with
    :func:`terminate_sessions`, the database is unreachable for its clients until allowed
    again, while the server keeps running for the other tests."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS '
                     f"{'true' if allow else 'false'}")


class PgProxy:
    """A TCP proxy to PostgreSQL on a free local port, run in the test's event loop: the network
    between a store and its database, for fault tests.

    :meth:`cut` resets every connection and stops listening (connection refused: a stopped or
    unreachable server); :meth:`silence` keeps the connections open but drops every byte (a
    partition without resets); :meth:`restore` listens again on the same port and forwards.
    """

    def __init__(self) -> None:
        target = urlsplit(ADMIN_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 5432)
        self.port = 0
        self.silent = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def url_for(self, dbname: str) -> str:
        """A URL of database ``dbname`` through this proxy."""
        parts = urlsplit(url_for(dbname))
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    async def start(self) -> PgProxy:
        """Listen (on a free port the first time, on the same port after :meth:`cut`)."""
        self.silent = False
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    restore = start

    def silence(self) -> None:
        """Drop every byte from now on, in both directions, keeping the connections open."""
        self.silent = True

    async def cut(self) -> None:
        """Stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()
        await asyncio.sleep(0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.silent:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()
