"""The job store's one entry: :func:`open_store` opens the
:class:`~colmap_pipeline.jobs.JobStore` the settings ask for.

- ``DATABASE_URL`` set (``postgresql://…``): :class:`colmap_pipeline.stores.postgres.
  PostgresJobStore` (several replicas share it; issue 12). It wins over ``DATABASE_PATH``.
- otherwise (embedded mode, the default): :class:`SqliteJobStore` on ``DATABASE_PATH``
  (default ``DATA_DIR/colmap_app.db``).

The implementations live in :mod:`colmap_pipeline.stores`; only this module and ``main.py``
import them. The PostgreSQL one (and psycopg) is imported only when ``DATABASE_URL`` is set, so
the embedded mode never loads it. ``SqliteJobStore`` and its ``MIGRATIONS`` are re-exported for
the callers that open the SQLite store by name (tests, ``scripts/bench_polling.py``).
"""
from __future__ import annotations

from pathlib import Path

from colmap_pipeline.config import Settings
from colmap_pipeline.jobs import JobStore
from colmap_pipeline.layout import DataDir
from colmap_pipeline.stores.sqlite import MIGRATIONS, SqliteJobStore

__all__ = ["MIGRATIONS", "SqliteJobStore", "is_postgres_url", "open_store"]

#: URL schemes that select the PostgreSQL store (libpq accepts both)
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(url: str | None) -> bool:
    """Whether ``url`` (``DATABASE_URL``) names a PostgreSQL database."""
    return bool(url) and str(url).startswith(POSTGRES_SCHEMES)


async def open_store(settings: Settings) -> JobStore:
    """Open (and migrate) the job store of ``settings``: PostgreSQL when ``DATABASE_URL`` is
    set, else SQLite on ``DATABASE_PATH`` (default ``DATA_DIR/colmap_app.db``).

    Raises: ValueError for a ``DATABASE_URL`` that is not ``postgresql://…``; StoreUnavailable
    when the database cannot be reached or opened.
    """
    url = settings.database_url
    if url:
        if not is_postgres_url(url):
            raise ValueError("DATABASE_URL must start with postgresql:// (or postgres://)")
        from colmap_pipeline.stores.postgres import PostgresJobStore  # psycopg: this mode only
        return await PostgresJobStore.open(url)
    path = settings.database_path or DataDir(settings.data_dir).database
    return await SqliteJobStore.open(Path(path))
