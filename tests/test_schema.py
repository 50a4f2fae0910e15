"""The schema the migrations build is the one the models declare (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import UniqueConstraint, create_engine, inspect, text

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


@pytest.mark.parametrize("table", sorted(Base.metadata.tables))
def test_migrations_build_the_declared_columns(database_url: str, table: str) -> None:
    index = Index(database_url)
    try:
        index.upgrade()
        built = sorted(column["name"] for column in inspect(index.engine).get_columns(table))
    finally:
        index.close()
    assert built == sorted(column.name for column in Base.metadata.tables[table].columns)


@pytest.mark.parametrize("table", sorted(Base.metadata.tables))
def test_migrations_build_the_declared_unique_constraints(database_url: str, table: str) -> None:
    index = Index(database_url)
    try:
        index.upgrade()
        inspector = inspect(index.engine)
        built = sorted(sorted(found["column_names"])
                       for found in inspector.get_unique_constraints(table))
    finally:
        index.close()
    declared = sorted(sorted(column.name for column in constraint.columns)
                      for constraint in Base.metadata.tables[table].constraints
                      if isinstance(constraint, UniqueConstraint))
    assert built == declared


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


def test_an_index_made_before_counts_were_computed_keeps_its_rows(tmp_path: Path,
                                                                  database_url: str) -> None:
    """0004 drops the count columns of a populated index: the rows stay, and a query counts
    what is there."""
    from alembic import command
    from alembic.config import Config

    from gateway.core import Gateway
    from gateway.index import MIGRATIONS
    from tests.support.common import ct_dataset, make_settings, part10, study_counts

    index = Index(database_url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with index.write_engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0003_redundant_indexes")
        with index.write_engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, "
                "patient_name_norm, patient_birth_date, patient_sex) "
                "VALUES ('P1', '', '', '', '', '')"))
            connection.execute(text(
                "INSERT INTO study (patient_pk, study_instance_uid, study_date, study_time, "
                "accession_number, study_id, study_description, referring_physician_name, "
                "referring_physician_name_norm, timezone_offset, modalities_in_study, "
                "number_of_series, number_of_instances, confidentiality, attributes, "
                "created_at, updated_at) SELECT pk, '1.2.3', '', '', '', '', '', '', '', "
                "'', 'CT', 1, 7, 'private', '{}', '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00' FROM patient"))
            connection.execute(text(
                "INSERT INTO series (study_pk, series_instance_uid, modality, series_number, "
                "series_description, body_part_examined, performed_procedure_step_start_date, "
                "performed_procedure_step_start_time, series_date, series_time, "
                "number_of_instances, attributes, created_at) SELECT pk, '1.2.3.9', 'SR', 9, "
                "'', '', '', '', '', '', 1, '{}', '2026-01-01 00:00:00' FROM study"))
            connection.execute(text(
                "INSERT INTO instance (series_pk, sop_instance_uid, sop_class_uid, "
                "transfer_syntax_uid, file_path, file_size, digest, metadata_json, source, "
                "created_at) SELECT pk, '1.2.3.9.1', '1.2.840.10008.5.1.4.1.1.88.11', "
                "'1.2.840.10008.1.2.1', '1.2.3/1.2.3.9/1.2.3.9.1.abcdefabcdef.dcm', 10, "
                "'ab', '{}', 'cli', '2026-01-01 00:00:00' FROM series"))
    finally:
        index.close()
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway:  # migrates to the newest revision
        with gateway.index.Session() as session:
            assert session.execute(text("SELECT confidentiality FROM study")).scalar() == "private"
        assert gateway.index.has_file("1.2.3/1.2.3.9/1.2.3.9.1.abcdefabcdef.dcm")
        assert not gateway.index.has_file("1.2.3/1.2.3.9/1.2.3.9.1.000000000000.dcm")
        ds = ct_dataset(0, study="1.2.3")
        ds.PatientID = "P1"  # the study's own patient (another would be refused)
        gateway.ingestor.ingest(part10(ds))
        assert study_counts(gateway, "1.2.3") == (2, 2, "CT\\SR")


def test_dsp_dates_recorded_before_0005_are_kept_per_patient_identity(
        tmp_path: Path, database_url: str) -> None:
    """0005 moves ``patient.dsp_created`` to ``dsp_patient``: a date recorded on a patient row
    is still the date the link rules read, and the column is gone."""
    from alembic import command
    from alembic.config import Config

    from gateway.core import Gateway
    from gateway.index import MIGRATIONS
    from gateway.patients import dsp_created
    from tests.support.common import make_settings

    index = Index(database_url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with index.write_engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0004_counts_when_asked")
        with index.write_engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, "
                "patient_name_norm, patient_birth_date, patient_sex, dsp_created) "
                "VALUES ('P1', 'LUX', '', '', '', '', '20200101'), "
                "('P2', '', '', '', '', '', NULL)"))
    finally:
        index.close()
    settings = make_settings(tmp_path, database_url)
    with Gateway(settings) as gateway, gateway.index.Session() as session:
        assert dsp_created(session, "P1", "LUX") == "20200101"
        assert dsp_created(session, "P1", "") is None
        assert dsp_created(session, "P2", "") is None
        columns = {c["name"] for c in inspect(session.connection()).get_columns("patient")}
        assert "dsp_created" not in columns


@pytest.mark.parametrize(("model", "column", "index_name"), [
    ("Patient", "patient_name_norm", "ix_patient_patient_name_norm"),
    ("Study", "referring_physician_name_norm", "ix_study_referring_physician_name_norm"),
])
def test_person_name_prefix_is_answered_from_an_index(database_url: str, model: str,
                                                      column: str, index_name: str) -> None:
    """``PatientName=SCHM*`` is ``LIKE 'SCHM%'`` on PostgreSQL: its B-tree must be bytewise
    (``varchar_pattern_ops``, migration 0008) to serve it in a non-C collation; else every row
    is read. (SQLite's GLOB uses the plain index.)"""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's LIKE and operator classes")
    from sqlalchemy import select

    from gateway import models
    from gateway.query import Wildcard

    table = getattr(models, model).__table__
    index = Index(database_url)
    try:
        index.upgrade()
        stmt = select(table.c.pk).where(Wildcard(table.c[column], "SCHM*"))
        compiled = stmt.compile(index.engine)
        with index.engine.connect() as connection:
            connection.execute(text("SET enable_seqscan = off"))  # the table is tiny here
            plan = "\n".join(connection.exec_driver_sql(
                "EXPLAIN " + str(compiled), compiled.params).scalars())
    finally:
        index.close()
    assert index_name in plan, plan
