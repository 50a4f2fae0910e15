"""The ``[links]`` settings table (``Settings.extra["links"]``).

.. code-block:: toml

    [links]
    default_ttl = 1800          # seconds a minted link lives when the portal does not say
    max_ttl = 43200             # longest lifetime a link may have (minted or portal-signed)
    session_ttl = 28800         # longest viewer session; it also ends when its link expires
    leeway = 30                 # clock skew tolerated on nbf (no session opens past exp), seconds
    signing_kid = "gw-2026-11"  # the HS256 key new links are signed with
    viewer_dir = "viewer"       # the unpacked OHIF build (relative to the data folder)
    ohif_version = "3.13.2"     # the @ohif/app release `dicom-gateway viewer install` fetches
    cookie_name = "gw_session"
    refusal_window = 60         # seconds of a window of refusals of unverifiable links
    max_unverified_refusals = 30  # per source address and window, then 429 (per node)

    [[links.keys]]              # as many as needed: rotation keeps old ones verifying
    kid = "gw-2026-11"
    alg = "HS256"
    secret_file = "links-gw-2026-11.key"

    [[links.keys]]              # a portal that signs links itself
    kid = "dsp-portal-1"
    alg = "EdDSA"               # or ES256
    public_key_file = "/etc/dicom-gateway/dsp-portal-1.pem"

Without any HS256 key the gateway creates one in the data folder (``links-hs256.key``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Settings, SettingsError
from viewer_links.keys import KeyConfigError, KeyRing, key_from_table, local_secret

logger = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
DEFAULT_TTL = 30 * 60


@dataclass(frozen=True)
class LinkSettings:
    default_ttl: int = DEFAULT_TTL
    max_ttl: int = 12 * 3600
    session_ttl: int = 8 * 3600
    leeway: float = 30.0
    audience: str = "dicom-gateway"
    issuer: str = "dicom-gateway"
    signing_kid: str | None = None
    viewer_dir: Path = Path("viewer")
    ohif_version: str = OHIF_VERSION
    cookie_name: str = "gw_session"
    max_uses_limit: int = 1000
    refusal_window: int = 60
    max_unverified_refusals: int = 30


_INTS = ("default_ttl", "max_ttl", "session_ttl", "max_uses_limit", "refusal_window",
         "max_unverified_refusals")


def link_settings(settings: Settings) -> tuple[LinkSettings, KeyRing]:
    """Read ``[links]``; return the settings and the key ring.

    Raises
    ------
    SettingsError
        On an unknown key, a bad value, or an unusable key.
    """
    table: Mapping[str, Any] = settings.extra.get("links", {})
    values: dict[str, Any] = {}
    known = LinkSettings.__dataclass_fields__
    for name, value in table.items():
        if name == "keys":
            continue
        if name not in known:
            raise SettingsError(f"unknown setting [links] {name}; see viewer_links/settings.py")
        try:
            if name in _INTS:
                values[name] = int(value)
            elif name == "leeway":
                values[name] = float(value)
            elif name == "viewer_dir":
                values[name] = Path(str(value))
            else:
                values[name] = str(value)
        except (TypeError, ValueError):
            raise SettingsError(f"setting [links] {name}: {value!r} is not valid") from None
    link = LinkSettings(**values)
    if not (0 < link.default_ttl <= link.max_ttl):
        raise SettingsError("[links] default_ttl must be positive and at most max_ttl")
    if link.session_ttl <= 0 or link.leeway < 0:
        raise SettingsError("[links] session_ttl must be positive and leeway not negative")
    if link.refusal_window <= 0 or link.max_unverified_refusals <= 0:
        raise SettingsError("[links] refusal_window and max_unverified_refusals must be positive")
    if not link.viewer_dir.is_absolute():
        link = LinkSettings(**{**link.__dict__, "viewer_dir": settings.data_dir / link.viewer_dir})
    try:
        keys = [key_from_table(t, settings.data_dir) for t in table.get("keys", [])]
        if not any(k.can_sign for k in keys):
            keys.append(local_secret(settings.data_dir / "links-hs256.key"))
            if settings.storage.url:
                # Instances in a shared bucket: likely one node of several, which would each
                # sign with a key of its own and refuse the others' links.
                logger.warning("links are signed with this node's own key (links-hs256.key in "
                               "the data folder); other nodes refuse them: give every node the "
                               "same [[links.keys]] (docs/deploy.md)")
        ring = KeyRing(keys, signing_kid=link.signing_kid, audience=link.audience,
                       issuer=link.issuer, leeway=link.leeway)
    except KeyConfigError as exc:
        raise SettingsError(f"[links] {exc}") from None
    return link, ring
