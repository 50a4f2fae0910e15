"""``dicom-gateway demo`` prints a working viewer link; ``links mint|list|revoke``; ``viewer
install`` (real npm, real registry tarball) — each run as a real process."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.links_helpers import Client, cookie_of, fake_viewer
from tests.test_cli import run
from viewer_links.settings import OHIF_VERSION
from viewer_links.viewer import VERSION_FILE, installed_version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[links]\nviewer_dir = "{fake_viewer(tmp_path / "viewer")}"\n')
    return {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_STORAGE_MIN_FREE_BYTES": "0", "GATEWAY_CONFIG": str(config),
            "GATEWAY_HTTP_PORT": str(free_port()), "GATEWAY_DIMSE_PORT": "0"}


def test_demo_prints_a_working_link(tmp_path: Path, env: dict[str, str]) -> None:
    result = run(["demo"], env)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("Viewer link"))
    url = line.split(": ", 1)[1]
    parts = urlsplit(url)
    assert parts.port == int(env["GATEWAY_HTTP_PORT"]) and parts.path.startswith("/view/")
    server = GatewayProcess({**env, "GATEWAY_DEMO": "1"}, tmp_path / "serve.log").start()
    try:
        browser = Client(f"http://127.0.0.1:{server.http_port}")
        opened = browser.request("GET", parts.path)
        assert opened.status == 303, opened.text
        assert opened.headers["Location"].startswith("/viewer?StudyInstanceUIDs=")
        assert cookie_of(opened)[0]
        assert parts.path[6:] not in (tmp_path / "serve.log").read_text()
    finally:
        server.stop()


@pytest.mark.slow  # ten CLI processes in a row
def test_links_mint_list_revoke(env: dict[str, str]) -> None:
    assert run(["demo"], env).returncode == 0
    study = run(["links", "list"], env).stdout.splitlines()[1].split()[1]
    minted = run(["links", "mint", "--study", study, "--viewer-id", "dr-x",
                  "--relationship", "trust_circle", "--max-uses", "3"], env)
    assert minted.returncode == 0, minted.stderr
    assert "/view/" in minted.stdout
    jti = minted.stderr.split()[1].rstrip(",")
    listing = run(["links", "list", "--active"], env).stdout
    assert jti in listing and "0/3" in listing and "trust_circle" in listing
    assert run(["links", "revoke", jti], env).returncode == 0
    assert jti not in run(["links", "list", "--active"], env).stdout
    assert "revoked" in run(["links", "list"], env).stdout
    refused = run(["links", "mint", "--study", study, "--viewer-id", "x",
                   "--relationship", "neighbour"], env)
    assert refused.returncode == 2 and "relationship" in refused.stderr
    ahead = run(["links", "revoke", "not-opened-yet"], env)
    assert ahead.returncode == 0 and "not opened yet" in ahead.stdout
    missing = run(["links", "revoke", "x" * 65], env)
    assert missing.returncode == 2 and "no link" in missing.stderr


@pytest.mark.parametrize("command", [["links"], ["links", "mint"], ["viewer", "install"]])
def test_help(command: list[str]) -> None:
    result = run([*command, "--help"], {})
    assert result.returncode == 0 and "usage: dicom-gateway" in result.stdout


@pytest.mark.slow  # npm downloads OHIF
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_viewer_install(tmp_path: Path) -> None:
    dest = tmp_path / "viewer"
    result = run(["viewer", "install", "--dest", str(dest)], {}, timeout=900)
    assert result.returncode == 0, result.stderr
    assert installed_version(dest) == OHIF_VERSION
    assert (dest / VERSION_FILE).read_text().strip() == OHIF_VERSION
    assert (dest / "index.html").is_file() and list(dest.glob("app.bundle.*.js"))
    again = run(["viewer", "install", "--dest", str(dest)], {})
    assert again.returncode == 0 and "already installed" in again.stdout
    bad = run(["viewer", "install", "--dest", str(tmp_path / "v2"), "--version", "0.0.0-none"],
              {}, timeout=300)
    assert bad.returncode == 1 and "npm pack" in bad.stderr
    assert not (tmp_path / "v2").exists()
