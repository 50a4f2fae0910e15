"""Bearer credentials: static API keys and JWTs (PyJWT) verified against configured keys.

Settings (TOML; the environment cannot hold keys well)::

    [auth]
    jwt_audience = "dicom-gateway"        # optional; checked when set
    jwt_issuer = "https://portal.example" # optional; checked when set
    jwt_max_lifetime = 3600               # seconds a JWT may live (exp - iat); default 1 h

    [auth.jwt_keys.portal-2026]           # the table name is the key id (``kid``)
    algorithm = "ES256"                   # HS256, ES256, EdDSA, RS256...
    key_file = "/etc/gateway/portal.pub"  # or: key = "..." (inline secret / PEM)

A JWT must carry ``kid`` in its header, ``sub``, ``iat`` and ``exp`` (a lifetime ``exp - iat``
of at most ``jwt_max_lifetime``: a stolen token is not good for long), and its scopes as
``scope`` (a space-separated string, RFC 8693) or ``scopes`` (a list). An ``institution`` claim
is kept. An HMAC key must be at least as long as its hash (32 bytes for HS256, RFC 7518 §3.2):
a short secret can be found offline from one token, and then any token forged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from gateway.access import DEMO_PRINCIPAL, AccessPolicy, Principal, PrincipalKind
from gateway.apikeys import CREDENTIAL as API_KEY_CREDENTIAL
from gateway.apikeys import ApiKeys, looks_like_api_key
from gateway.config import Settings, SettingsError
from gateway.errors import Unauthorized
from gateway.index import Index

logger = logging.getLogger(__name__)

LEEWAY_SECONDS = 30
DEFAULT_MAX_LIFETIME = 3600  # [auth] jwt_max_lifetime, seconds
# RFC 7518 §3.2: "A key of the same size as the hash output ... or larger MUST be used".
MIN_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
JWT_CREDENTIAL = "jwt:"  # Principal.credential of a JWT: "jwt:<kid>"
BEARER_HINT = "'Authorization: Bearer <API key or JWT>'"


@dataclass(frozen=True)
class JwtKey:
    kid: str
    algorithm: str
    key: Any

    def __repr__(self) -> str:
        return f"JwtKey(kid={self.kid!r}, algorithm={self.algorithm!r}, key=***)"


def load_jwt_keys(table: Mapping[str, Any]) -> dict[str, JwtKey]:
    """Read ``[auth.jwt_keys.<kid>]`` tables.

    Raises
    ------
    SettingsError
        When a key lacks its algorithm or material, or its file cannot be read.
    """
    keys: dict[str, JwtKey] = {}
    for kid, spec in table.items():
        if not isinstance(spec, Mapping) or "algorithm" not in spec:
            raise SettingsError(f"[auth.jwt_keys.{kid}] needs algorithm and key or key_file")
        if "key_file" in spec:
            try:
                material: Any = Path(str(spec["key_file"])).read_text()
            except OSError as exc:
                raise SettingsError(
                    f"[auth.jwt_keys.{kid}] key_file cannot be read: {exc.strerror}"
                ) from None
        elif "key" in spec:
            material = str(spec["key"])
        else:
            raise SettingsError(f"[auth.jwt_keys.{kid}] needs key or key_file")
        algorithm = str(spec["algorithm"])
        if algorithm.lower() == "none" or algorithm not in jwt.algorithms.get_default_algorithms():
            raise SettingsError(f"[auth.jwt_keys.{kid}] algorithm {algorithm!r} is not a "
                                "signature algorithm PyJWT knows (HS256, ES256, EdDSA, RS256...)")
        if not material.strip():
            raise SettingsError(f"[auth.jwt_keys.{kid}] has an empty key")
        minimum = MIN_HMAC_KEY_BYTES.get(algorithm)
        if minimum is not None and len(material.strip().encode()) < minimum:
            raise SettingsError(
                f"[auth.jwt_keys.{kid}] an {algorithm} secret must be at least {minimum} bytes "
                "(RFC 7518 §3.2); a shorter one can be guessed from a single token")
        keys[str(kid)] = JwtKey(str(kid), algorithm, material)
    return keys


class Authenticator:
    """Turns an ``Authorization: Bearer`` credential into a :class:`Principal`.

    Parameters
    ----------
    index
        Where API keys are stored.
    settings
        The ``[auth]`` table gives the JWT keys, audience and issuer.
    """

    def __init__(self, index: Index, settings: Settings) -> None:
        self.api_keys = ApiKeys(index)
        auth = dict(settings.extra.get("auth", {}))
        self.jwt_keys = load_jwt_keys(auth.get("jwt_keys", {}))
        self.audience: str | None = auth.get("jwt_audience")
        self.issuer: str | None = auth.get("jwt_issuer")
        try:
            self.max_lifetime = int(auth.get("jwt_max_lifetime", DEFAULT_MAX_LIFETIME))
        except (TypeError, ValueError):
            raise SettingsError("[auth] jwt_max_lifetime must be a number of seconds") from None
        if self.max_lifetime <= 0:
            raise SettingsError("[auth] jwt_max_lifetime must be positive")

    def principal_for(self, authorization: str | None, *, session: str | None = None,
                      policy: AccessPolicy | None = None, address: str = "",
                      demo: bool = False) -> Principal:
        """The caller of a request, from its credentials; the one decision every HTTP front
        end makes (deny by default).

        In order: the ``Authorization`` header (a bearer API key or JWT); else the viewer
        session cookie ``session``, resolved by ``policy``; else the demo principal when the
        server runs in demo mode. Without a credential or a policy it reads nothing (cheap
        enough for the event loop); otherwise call it in a worker thread.

        Raises
        ------
        Unauthorized
            No credential, or one that is malformed, invalid, expired or revoked.
        """
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized(f"use {BEARER_HINT}")
            return self.principal_for_bearer(token)
        if session and policy is not None:
            found = policy.principal_for_session(session, address)
            if found is None:
                raise Unauthorized("the viewer session has expired or was revoked; "
                                   "open the link again")
            return found
        if demo:
            return DEMO_PRINCIPAL
        raise Unauthorized(f"authentication required: send {BEARER_HINT}")

    def principal_for_bearer(self, token: str) -> Principal:
        """Verify a bearer token.

        Raises
        ------
        Unauthorized
            If the token is unknown, revoked, expired or badly signed (the message never
            repeats the token).
        """
        token = token.strip()
        if looks_like_api_key(token):
            principal = self.api_keys.principal(token)
            if principal is None:
                raise Unauthorized("the API key is unknown or revoked")
            return principal
        return self._jwt_principal(token)

    def _jwt_principal(self, token: str) -> Principal:
        if not self.jwt_keys:
            raise Unauthorized("the bearer token is not an API key and no JWT keys are configured")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is neither an API key nor a JWT") from None
        key = self.jwt_keys.get(str(header.get("kid", "")))
        if key is None:
            raise Unauthorized("the JWT's key id (kid) is not one of the configured keys")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[key.algorithm], audience=self.audience,
                issuer=self.issuer, leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the JWT was issued in the future (iat)") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the JWT was refused: {exc}") from None
        lifetime = claims["exp"] - claims["iat"]
        if lifetime > self.max_lifetime:
            raise Unauthorized(f"the JWT's lifetime (exp - iat) is {int(lifetime)} s, more than "
                               f"the {self.max_lifetime} s allowed")
        raw = claims.get("scope") or claims.get("scopes") or ""
        if isinstance(raw, str):
            scopes = raw.split()
        elif isinstance(raw, list):
            scopes = [str(s) for s in raw]
        else:
            raise Unauthorized("the JWT's scope claim must be a string or a list")
        return Principal(kind=PrincipalKind.JWT, id=str(claims["sub"]),
                         scopes=frozenset(scopes), display_name=str(claims.get("name", "")),
                         institution=claims.get("institution"), jti=claims.get("jti"),
                         credential=f"{JWT_CREDENTIAL}{key.kid}",
                         expires_at=datetime.fromtimestamp(claims["exp"], UTC))

    def credential_alive(self, credential: str | None) -> bool:
        """Whether a credential named by ``Principal.credential`` is still accepted.

        An API key until it is revoked; a JWT's key while it is configured (its ``exp`` is
        bound by the caller, from ``Principal.expires_at``). ``None`` or anything else: no.
        """
        if credential is None:
            return False
        if credential.startswith(API_KEY_CREDENTIAL):
            return self.api_keys.is_live(credential.removeprefix(API_KEY_CREDENTIAL))
        if credential.startswith(JWT_CREDENTIAL):
            return credential.removeprefix(JWT_CREDENTIAL) in self.jwt_keys
        return False
