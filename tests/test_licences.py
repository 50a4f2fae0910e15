"""The default install is free of GPL code (README, "Licences and decoders").

The gateway is Apache-2.0. Every distribution its default requirements pull in (the closure
of ``Requires-Dist`` without extras, as installed from the lock file) must carry a licence
that lets it be distributed under those terms: no GPL family licence. GPL-3.0 decoders are
opt-in extras (``libjpeg-gpl``), and psycopg (LGPL-3.0) comes with ``postgres`` only.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.markers import default_environment
from packaging.requirements import Requirement

PROJECT = "dicom-gateway"
# GPL, LGPL and AGPL in SPDX ids, licence names and trove classifiers.
COPYLEFT = re.compile(r"\b(A|L)?GPL|General Public License", re.IGNORECASE)


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement).lower()


def default_closure() -> dict[str, list[str]]:
    """Each distribution reachable from the project's default requirements, with its licence
    texts (License-Expression, License, and the ``License ::`` classifiers)."""
    environment = {**default_environment(), "extra": ""}
    seen: dict[str, list[str]] = {}
    pending = [PROJECT]
    wanted_extras: dict[str, set[str]] = {PROJECT: set()}
    while pending:
        name = pending.pop()
        dist = distribution(name)
        metadata = dist.metadata
        seen[_name(name)] = [
            *metadata.get_all("License-Expression", []),
            *([metadata["License"]] if metadata["License"] and len(metadata["License"]) < 200
              else []),
            *(c for c in metadata.get_all("Classifier", []) if c.startswith("License ::")),
        ]
        for text in dist.requires or []:
            requirement = Requirement(text)
            extras = wanted_extras.get(_name(name), set()) | {""}
            if requirement.marker is not None and not any(
                    requirement.marker.evaluate({**environment, "extra": extra})
                    for extra in extras):
                continue
            child = _name(requirement.name)
            wanted_extras.setdefault(child, set()).update(requirement.extras)
            if child not in seen and child not in pending:
                try:
                    distribution(child)
                except PackageNotFoundError:  # pragma: no cover - a broken install
                    raise AssertionError(f"{child}, required by {name}, is not installed") from None
                pending.append(child)
    return seen


def test_the_default_install_has_no_gpl_package() -> None:
    closure = default_closure()
    copyleft = {name: texts for name, texts in closure.items()
                if any(COPYLEFT.search(text) for text in texts)}
    assert copyleft == {}, f"GPL-family licences in the default install: {copyleft}"
    assert {"pydicom", "pynetdicom", "pylibjpeg-openjpeg", "python-gdcm"} <= closure.keys()


def test_the_gpl_decoder_and_the_postgres_driver_are_extras_only() -> None:
    requirements = [Requirement(text) for text in distribution(PROJECT).requires or []]
    extras_of = {_name(r.name): str(r.marker) for r in requirements}
    assert 'extra == "libjpeg-gpl"' in extras_of["pylibjpeg-libjpeg"]
    assert 'extra == "postgres"' in extras_of["psycopg"] or "psycopg" not in [
        _name(r.name) for r in requirements if r.marker is None]
