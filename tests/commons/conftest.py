"""Fixtures for the commons' tests (plain helpers are in commons_helpers.py, the PostgreSQL server in
commons_pg.py).

`db_url` runs a test twice: on SQLite (None: the file in the commons root) and on a real PostgreSQL server
started once per session (commons_pg.py). `made` is a fresh commons with a tiny base, its admin token,
and TestClient-backed clients.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from commons_helpers import BACKENDS, Made, make_commons
from commons_pg import PostgresMissing, drop_database, fresh_database, throwaway_postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    try:
        with throwaway_postgres() as url:
            yield url
    except PostgresMissing as err:
        pytest.fail(str(err))


@pytest.fixture(params=BACKENDS)
def db_url(request) -> Iterator[str | None]:
    """None for SQLite in the commons root; a fresh database's URL on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield None
        return
    url = fresh_database(request.getfixturevalue("postgres_server"))
    yield url
    drop_database(url)


@pytest.fixture
def made(tmp_path, tiny_encoder, db_url) -> Iterator[Made]:
    m = make_commons(tmp_path / "commons", tiny_encoder, db_url)
    yield m
    m.close()
