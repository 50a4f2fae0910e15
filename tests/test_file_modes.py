"""What holds patient data is the gateway's user's alone: instance files, the SQLite index (and
its -wal/-shm), the render cache and every folder above them are created 0600 / 0700, whatever
the umask leaves (a usual 022 would give 0644 / 0755)."""

from __future__ import annotations

import os
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core import Gateway
from tests.support.common import LiveServer, ct_dataset, make_settings
from tests.support.dimse_helpers import associate, wait_until


@pytest.fixture
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(root: Path) -> dict[str, int]:
    found = {str(root): stat.S_IMODE(root.stat().st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[str(path)] = stat.S_IMODE(path.lstat().st_mode)
    return found


def test_instances_index_and_cache_are_private(tmp_path: Path, database_url: str,
                                               usual_umask: None) -> None:
    settings = make_settings(tmp_path, database_url, GATEWAY_DEMO="1")
    ds = ct_dataset()
    with Gateway(settings) as gateway, LiveServer(gateway) as live:
        assoc = associate(live.dimse_port)
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        url = (f"{live.http_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/"
               f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/rendered")
        with urllib.request.urlopen(url) as response:
            assert response.status == 200
        # The rendered image is cached by a worker thread after the answer is sent.
        cache = settings.data_dir / "cache" / "rendered"
        assert wait_until(lambda: cache.is_dir() and any(
            p.is_file() and not p.name.startswith(".") for p in cache.rglob("*"))), \
            "nothing was cached"
        modes = modes_under(settings.data_dir)
        if database_url.startswith("sqlite"):
            index_file = Path(database_url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                path = Path(f"{index_file}{suffix}")
                assert path.exists(), path
                modes[str(path)] = stat.S_IMODE(path.stat().st_mode)
    files = [p for p in modes if Path(p).is_file()]
    assert any(p.endswith(".dcm") for p in files), "the instance was not stored"
    assert any("rendered" in p and Path(p).is_file() for p in files), "nothing was cached"
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o700 if Path(p).is_dir() else 0o600)}
    assert wrong == {}
