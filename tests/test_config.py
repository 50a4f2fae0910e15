"""Settings: defaults, TOML file, environment winning, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import SettingsError, load_settings


def test_defaults_match_the_design() -> None:
    settings = load_settings(environ={})
    assert settings.data_dir == Path("data")
    assert settings.dimse.port == 11112
    assert settings.dimse.ae_title == "DICOMGW"
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    assert settings.index_url.endswith("data/index.sqlite")
    assert settings.storage.overwrite is False


def test_data_dir_alone_moves_the_index(tmp_path: Path) -> None:
    settings = load_settings(environ={"GATEWAY_DATA_DIR": str(tmp_path)})
    assert settings.index_url == f"sqlite:///{tmp_path / 'index.sqlite'}"


def test_environment_wins_over_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[http]\nport = 9000\n[dimse]\nport = 104\nae_title = "FROMFILE"\n'
        '[dimse.destinations]\nWORKSTATION = { host = "127.0.0.1", port = 11113 }\n'
        '[dimse.peers.PACS]\nhost = "127.0.0.1"\nstore = true\nmove = false\n'
    )
    settings = load_settings(environ={"GATEWAY_CONFIG": str(config), "GATEWAY_HTTP_PORT": "9100"})
    assert settings.http.port == 9100
    assert settings.dimse.port == 104
    assert settings.dimse.ae_title == "FROMFILE"
    assert settings.dimse.destinations["WORKSTATION"].port == 11113
    peer = settings.dimse.peers["PACS"]
    assert (peer.store, peer.move, peer.find) == (True, False, False)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"GATEWAY_HTTP_PORT": "eighty"}, r"\[http\] port"),
        ({"GATEWAY_HTTP_PORT": "70000"}, "not a TCP port"),
        ({"GATEWAY_AE_TITLE": "A" * 17}, "AE title"),
        ({"GATEWAY_DEMO": "perhaps"}, "demo"),
        ({"GATEWAY_CONFIG": "/nonexistent/gateway.toml"}, "cannot read settings file"),
    ],
)
def test_bad_settings_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[http]\nprot = 1\n")
    with pytest.raises(SettingsError, match=r"unknown setting \[http\] prot"):
        load_settings(environ={"GATEWAY_CONFIG": str(config)})


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[http\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config)
