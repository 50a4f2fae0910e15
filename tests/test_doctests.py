"""The examples in the docstrings (core, DIMSE statuses, DICOMweb modules, query engine) run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "gateway.uids", "gateway.part10", "gateway.metadata", "gateway.storage", "gateway.status",
    "gateway.query", "gateway.apikeys", "gateway.equivalence", "gateway.events", "gateway.cli",
    "dimse.status", "gateway.http_status", "gateway.forwarded", "gateway.config", "dicomweb.media",
    "dicomweb.problems", "dicomweb.wado", "dicomweb.stow", "dicomweb.xml", "dicomweb.capabilities",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
