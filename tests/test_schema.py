"""The schema the migrations build is the one the models declare (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from gateway.index import Index
from gateway.models import Base


def declared_indexes(table: str) -> dict[str, list[str]]:
    return {str(index.name): [column.name for column in index.columns]
            for index in Base.metadata.tables[table].indexes}


@pytest.mark.parametrize("table", sorted(Base.metadata.tables))
def test_migrations_build_the_declared_indexes(database_url: str, table: str) -> None:
    index = Index(database_url)
    try:
        index.upgrade()
        built = {str(found["name"]): list(found["column_names"])
                 for found in inspect(index.engine).get_indexes(table)
                 if str(found["name"]).startswith("ix_")}
    finally:
        index.close()
    assert built == declared_indexes(table)


def test_no_single_column_index_that_a_composite_one_starts_with() -> None:
    """Each such index would be written for every stored instance and never read."""
    for table in Base.metadata.tables.values():
        composite_prefixes = {index.columns[0].name for index in table.indexes
                              if len(index.columns) > 1}
        single = {index.columns[0].name: index.name for index in table.indexes
                  if len(index.columns) == 1 and not index.unique}
        assert not composite_prefixes & single.keys(), (table.name, single)


def test_a_series_instances_are_found_through_the_composite_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = Index(url)
    try:
        index.upgrade()
    finally:
        index.close()
    engine = create_engine(url)
    with engine.connect() as connection:
        plan = " ".join(str(row[-1]) for row in connection.execute(
            text("EXPLAIN QUERY PLAN SELECT pk FROM instance WHERE series_pk = 1")))
    engine.dispose()
    assert "ix_instance_series_number" in plan
