"""Static API keys: created, listed and revoked by an operator, stored hashed.

A key reads ``dgw_<key_id>_<secret>``: the key id finds the row, the secret is compared by its
SHA-256 with :func:`hmac.compare_digest`. The key itself is shown once, at creation
(``dicom-gateway apikey create``), and never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.access import Principal, PrincipalKind, Scope
from gateway.errors import Conflict, GatewayError, InvalidScope, NotFound
from gateway.index import Index
from gateway.models import ApiKey

logger = logging.getLogger(__name__)

PREFIX = "dgw_"
CREDENTIAL = "api_key:"  # Principal.credential of a key: "api_key:<key id>"
_KEY_RE = re.compile(r"^dgw_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._@:-]{1,128}$")
KNOWN_SCOPES = frozenset(s.value for s in Scope)


class Secret(str):
    """A string whose ``repr`` hides it, for keys on their way to the operator's screen."""

    def __repr__(self) -> str:
        return "Secret('**********')"


@dataclass(frozen=True)
class ApiKeyInfo:
    """What ``apikey list`` shows of a key (never the secret)."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    institution: str | None
    created_at: datetime
    revoked_at: datetime | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Split and check a scope list (``"dicomweb:read,dicomweb:write"``).

    >>> parse_scopes("dicomweb:read, admin")
    ('admin', 'dicomweb:read')

    Raises
    ------
    InvalidScope
        On an unknown scope, naming the known ones.
    """
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    scopes = sorted({s.strip() for s in items if s.strip()})
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown:
        raise InvalidScope(
            f"unknown scope {', '.join(unknown)}; known scopes: {', '.join(sorted(KNOWN_SCOPES))}"
        )
    return tuple(scopes)


def looks_like_api_key(token: str) -> bool:
    return token.startswith(PREFIX)


class ApiKeys:
    """The API key store, in the index database.

    Parameters
    ----------
    index
        The gateway's index; writes go through :meth:`gateway.index.Index.write`.
    """

    def __init__(self, index: Index) -> None:
        self.index = index

    def create(self, name: str, scopes: str | list[str] | tuple[str, ...],
               institution: str | None = None) -> Secret:
        """Create a key; return it (the only time it is ever available).

        Raises
        ------
        InvalidScope
            On an unknown scope.
        Conflict
            If a key of that name exists (revoked keys keep their names).
        """
        if not _NAME_RE.match(name):
            raise GatewayError(
                f"key name {name!r}: use 1 to 128 letters, digits and . _ @ : -"
            )
        checked = parse_scopes(scopes)
        if not checked:
            raise InvalidScope("give at least one scope, e.g. --scopes dicomweb:read")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)

        def work(session: Session) -> None:
            session.add(ApiKey(key_id=key_id, name=name, secret_hash=_hash(secret),
                               scopes=" ".join(checked), institution=institution,
                               created_at=datetime.now(UTC)))
            session.flush()

        try:
            self.index.write(work)
        except IntegrityError:
            raise Conflict(f"an API key named {name!r} already exists") from None
        logger.info("API key %s (%s) created with scopes %s", key_id, name, " ".join(checked))
        return Secret(f"{PREFIX}{key_id}_{secret}")

    def list(self) -> list[ApiKeyInfo]:
        with self.index.Session() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.pk)).all()
        return [ApiKeyInfo(r.key_id, r.name, tuple(r.scopes.split()), r.institution,
                           r.created_at, r.revoked_at) for r in rows]

    def revoke(self, name_or_id: str) -> None:
        """Revoke a key by name or key id; it stops working at once.

        Raises
        ------
        NotFound
            If no live key has that name or id.
        """

        def work(session: Session) -> int:
            result = session.execute(
                update(ApiKey)
                .where((ApiKey.name == name_or_id) | (ApiKey.key_id == name_or_id),
                       ApiKey.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

        if not self.index.write(work):
            raise NotFound(f"no active API key named {name_or_id!r}")
        logger.info("API key %s revoked", name_or_id)

    def principal(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked key, else ``None``."""
        match = _KEY_RE.match(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        with self.index.Session() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_id == key_id)).one_or_none()
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.secret_hash, _hash(secret)):
            return None
        return Principal(kind=PrincipalKind.API_KEY, id=row.name,
                         scopes=frozenset(row.scopes.split()), display_name=row.name,
                         institution=row.institution, credential=f"{CREDENTIAL}{row.key_id}")

    def is_live(self, key_id: str) -> bool:
        """Whether the key ``key_id`` exists and is not revoked (what it opened may go on)."""
        with self.index.Session() as session:
            return session.scalar(select(ApiKey.pk).where(
                ApiKey.key_id == key_id, ApiKey.revoked_at.is_(None))) is not None
