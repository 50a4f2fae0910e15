"""Databases of a test's own on the test PostgreSQL server (``GATEWAY_TEST_DATABASE_URL``):
for what a schema of its own cannot show (a node's first start on an empty database, a
restore into a new one)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, make_url, text

PG_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL", "")


@contextmanager
def new_databases(prefix: str) -> Iterator[Callable[[], str]]:
    """A maker of new, empty databases (each call returns one's URL); all dropped at the end."""
    made: list[str] = []
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")

    def new() -> str:
        name = f"{prefix}_{secrets.token_hex(5)}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)

    try:
        yield new
    finally:
        with admin.connect() as connection:
            for name in made:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
