"""Signing and verifying viewer links: compact JWTs (RFC 7519) with a key id, via PyJWT.

Two kinds of keys, any number of each at once (rotation: add the new key, make it the signing
key, keep the old one until the links it signed have expired):

- ``HS256`` secrets the gateway holds: it signs the links it mints (``POST /api/links``);
- ``EdDSA`` (Ed25519) and ``ES256`` (P-256) *public* keys of portals that sign links themselves.

Every token names its key in the ``kid`` header; only that key and its algorithm are tried, so a
token can never choose a weaker algorithm (RFC 8725 §3.1). Errors follow itsdangerous's shape:
:class:`LinkError` is the base; each subclass carries a machine-readable ``reason`` and its
HTTP status (a :class:`gateway.http_status.HTTPProblem`, so the portal API answers it as any
other error, with ``reason`` in the problem document).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.http_status import HTTPProblem

logger = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256"})
PUBLIC_ALGORITHMS = frozenset({"EdDSA", "ES256"})
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: a key of the same size as the hash output, at least


class KeyConfigError(ValueError):
    """A configured key is unusable; the message names it and says why."""


class Secret:
    """A secret value whose ``repr`` never shows it (as starlette's ``Secret``)."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"


@dataclass(frozen=True)
class Key:
    """One verification (and, for HS256, signing) key."""

    kid: str
    algorithm: str
    secret: Secret | None = None  # HS256
    public_key: Any = None  # EdDSA / ES256: a cryptography public key object

    @property
    def can_sign(self) -> bool:
        return self.secret is not None

    def verification_key(self) -> Any:
        return self.secret.reveal() if self.secret is not None else self.public_key


class LinkError(HTTPProblem):
    """A link that cannot be honoured. ``reason`` is stable and machine-readable."""

    reason = "invalid"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(type(self).status, message,
                         members={"reason": getattr(self, "rule", None) or self.reason})


class MalformedLink(LinkError):
    reason = "malformed"


class UnknownKey(LinkError):
    reason = "unknown_kid"
    status = 403


class BadSignature(LinkError):
    reason = "bad_signature"
    status = 403


class WrongAudience(LinkError):
    reason = "wrong_audience"
    status = 403


class LinkExpired(LinkError):
    reason = "expired"
    status = 410


class NotYetValid(LinkError):
    reason = "not_yet_valid"
    status = 403


class LinkRevoked(LinkError):
    reason = "revoked"
    status = 410


class LinkUsedUp(LinkError):
    reason = "used_up"
    status = 410


class PolicyRefused(LinkError):
    """The DSP confidentiality rules refuse the viewer (``detail`` says which rule)."""

    reason = "policy"
    status = 403

    def __init__(self, message: str, rule: str) -> None:
        self.rule = rule
        super().__init__(message)


class StudyUnavailable(LinkError):
    reason = "not_found"
    status = 404


def load_public_key(kid: str, algorithm: str, pem: str | bytes) -> Any:
    """Load and check a portal's PEM public key for ``algorithm``."""
    try:
        key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise KeyConfigError(f"key {kid}: not a PEM public key ({exc})") from None
    if algorithm == "EdDSA" and not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyConfigError(f"key {kid}: EdDSA needs an Ed25519 public key")
    if algorithm == "ES256" and not (
        isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    ):
        raise KeyConfigError(f"key {kid}: ES256 needs a P-256 (secp256r1) public key")
    return key


def key_from_table(table: Mapping[str, Any], base: Path) -> Key:
    """Build a key from one ``[[links.keys]]`` TOML table.

    ``{kid, alg = "HS256", secret | secret_file}`` or
    ``{kid, alg = "EdDSA" | "ES256", public_key | public_key_file}``; relative files are read
    from ``base`` (the data folder).
    """
    kid = str(table.get("kid", "")).strip()
    algorithm = str(table.get("alg", "HS256"))
    if not kid or len(kid) > 64:
        raise KeyConfigError("every [[links.keys]] entry needs a kid of 1 to 64 characters")

    def read(name: str) -> bytes | None:
        if name in table:
            return str(table[name]).encode()
        if f"{name}_file" in table:
            path = Path(str(table[f"{name}_file"]))
            try:
                return (path if path.is_absolute() else base / path).read_bytes().strip()
            except OSError as exc:
                raise KeyConfigError(f"key {kid}: cannot read {path}: {exc.strerror}") from None
        return None

    if algorithm in HMAC_ALGORITHMS:
        secret = read("secret")
        if secret is None or len(secret) < MIN_SECRET_BYTES:
            raise KeyConfigError(
                f"key {kid}: an HS256 secret of at least {MIN_SECRET_BYTES} bytes is required")
        return Key(kid, algorithm, secret=Secret(secret))
    if algorithm in PUBLIC_ALGORITHMS:
        pem = read("public_key")
        if pem is None:
            raise KeyConfigError(f"key {kid}: {algorithm} needs public_key or public_key_file")
        return Key(kid, algorithm, public_key=load_public_key(kid, algorithm, pem))
    raise KeyConfigError(f"key {kid}: alg {algorithm!r} is not HS256, EdDSA or ES256")


def local_secret(path: Path) -> Key:
    """The gateway's own HS256 key, created once in the data folder (mode 0600).

    Used when no HS256 key is configured, so that a fresh install can mint links that survive
    a restart. Its kid derives from the secret (``local-<8 hex>``).
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(secrets.token_urlsafe(48).encode())
        tmp.chmod(0o600)
        tmp.replace(path)
    secret = path.read_bytes().strip()
    kid = "local-" + hashlib.sha256(secret).hexdigest()[:8]
    return Key(kid, "HS256", secret=Secret(secret))


class KeyRing:
    """The keys the gateway verifies links with, and the one it signs with.

    Parameters
    ----------
    keys
        Every accepted key (unique kids).
    signing_kid
        The HS256 key new links are signed with; the first HS256 key when ``None``.
    audience, issuer
        The ``aud`` every link must carry, and the ``iss`` of links the gateway signs.
    leeway
        Clock skew tolerated on ``exp`` and ``nbf``, in seconds (RFC 7519 §4.1.4).
    """

    def __init__(self, keys: Iterable[Key], *, signing_kid: str | None = None,
                 audience: str = "dicom-gateway", issuer: str = "dicom-gateway",
                 leeway: float = 30.0) -> None:
        self.keys: dict[str, Key] = {}
        for key in keys:
            if key.kid in self.keys:
                raise KeyConfigError(f"key id {key.kid!r} is configured twice")
            self.keys[key.kid] = key
        signers = [k for k in self.keys.values() if k.can_sign]
        if signing_kid is None:
            if not signers:
                raise KeyConfigError("no HS256 key to sign links with")
            self.signing_key = signers[0]
        else:
            chosen = self.keys.get(signing_kid)
            if chosen is None or not chosen.can_sign:
                raise KeyConfigError(f"signing_kid {signing_kid!r} is not a configured HS256 key")
            self.signing_key = chosen
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign ``claims`` with the signing key; the ``kid`` header names it.

        >>> ring = KeyRing([Key("k1", "HS256", secret=Secret(b"s" * 32))])
        >>> token = ring.sign({"sub": "dr", "jti": "x", "aud": "dicom-gateway",
        ...                    "nbf": 0, "exp": 2**40})
        >>> jwt.get_unverified_header(token)["kid"]
        'k1'
        """
        key = self.signing_key
        return jwt.encode(dict(claims), key.verification_key(), algorithm=key.algorithm,
                          headers={"kid": key.kid})

    def verify(self, token: str, *, audience: str | None = None,
               required: Iterable[str] = ("exp", "nbf", "jti", "sub", "aud")) -> dict[str, Any]:
        """Check a token's key, signature, audience and validity period; return its claims.

        Raises
        ------
        MalformedLink, UnknownKey, BadSignature, WrongAudience, LinkExpired, NotYetValid
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise MalformedLink("the link is not a well-formed signed token") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise UnknownKey("the link names no key (kid)")
        key = self.keys.get(kid)
        if key is None:
            raise UnknownKey(f"the link is signed with an unknown key {kid[:64]!r}")
        if header.get("alg") != key.algorithm:
            raise BadSignature(f"key {kid} signs with {key.algorithm}, not {header.get('alg')}")
        try:
            return jwt.decode(
                token, key.verification_key(), algorithms=[key.algorithm],
                audience=audience or self.audience, leeway=self.leeway,
                options={"require": list(required)},
            )
        except jwt.ExpiredSignatureError:
            raise LinkExpired("the link has expired") from None
        except jwt.ImmatureSignatureError:
            raise NotYetValid("the link is not valid yet") from None
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
            if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim != "aud":
                raise MalformedLink(f"the link lacks the {exc.claim} claim") from None
            raise WrongAudience("the link was made for another audience") from None
        except jwt.InvalidSignatureError:
            raise BadSignature("the link's signature does not match") from None
        except jwt.PyJWTError as exc:
            raise MalformedLink(f"the link is malformed: {exc}") from None


def signed_claims(ring: KeyRing, token: str) -> dict[str, Any] | None:
    """The claims of a token whose *signature* verifies, ignoring its time and audience checks.

    Used only to attribute a refusal (expired, not yet valid, wrong audience) to the right
    patient and link in the access trail; never to grant anything.
    """
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = ring.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            return None
        return jwt.decode(token, key.verification_key(), algorithms=[key.algorithm],
                          options={"verify_exp": False, "verify_nbf": False,
                                   "verify_aud": False, "verify_iat": False})
    except jwt.PyJWTError:
        return None


def now() -> int:
    return int(time.time())


__all__ = [
    "BadSignature", "Key", "KeyConfigError", "KeyRing", "LinkError", "LinkExpired",
    "LinkRevoked", "LinkUsedUp", "MalformedLink", "NotYetValid", "PolicyRefused", "Secret",
    "StudyUnavailable", "UnknownKey", "WrongAudience", "key_from_table", "load_public_key",
    "local_secret",
]
