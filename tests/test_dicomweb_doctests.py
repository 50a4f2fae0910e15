"""The examples in the DICOMweb modules' and the query engine's docstrings run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["gateway.query", "gateway.apikeys", "dicomweb.media", "dicomweb.problems",
           "dicomweb.wado", "dicomweb.stow", "dicomweb.xml"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
