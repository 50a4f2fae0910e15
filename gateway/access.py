"""Who is asking, and what they may see.

Every DICOMweb request carries a :class:`Principal`: an API key or JWT bearer (scopes), a viewer
session (one study, or its key images only), the anonymous local-demo user, or a DIMSE peer.
Queries and retrievals are filtered through :meth:`Principal.study_filter` /
:meth:`Principal.may_see`, never only in the UI.

Front ends do not import each other: what ``dicomweb`` needs to know of a viewer-link session
goes through the :class:`AccessPolicy` protocol, implemented by ``viewer_links`` and injected by
the composition root (DESIGN.md).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from gateway.errors import Forbidden


class Scope(enum.StrEnum):
    DICOMWEB_READ = "dicomweb:read"
    DICOMWEB_WRITE = "dicomweb:write"
    LINKS_MINT = "links:mint"
    AUDIT_READ = "audit:read"
    # Confidentiality levels and DSP creation dates: what the DSP rules decide on. Kept apart
    # from links:mint, so that a credential that makes links cannot widen who they admit.
    POLICY_WRITE = "policy:write"
    EVENTS_READ = "events:read"
    ADMIN = "admin"


class PrincipalKind(enum.StrEnum):
    API_KEY = "api_key"
    JWT = "jwt"
    VIEWER_SESSION = "viewer_session"
    DEMO = "demo"
    DIMSE = "dimse"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes
    ----------
    kind, id
        What authenticated it and its stable identifier (API key name, JWT subject, viewer
        id, AE title). Never a secret.
    scopes
        Granted scopes; ``admin`` implies all.
    study_uids
        ``None``: any study; otherwise only these studies (a viewer session).
    instance_uids
        ``None``: every instance of the visible studies; otherwise only these (key images).
    credential
        The bearer credential that authenticated it, for what it opens to be bound to it:
        ``api_key:<key id>`` or ``jwt:<kid>``; ``None`` for others. Never a secret.
    expires_at
        When that credential stops being valid (a JWT's ``exp``); ``None``: until revoked.
    """

    kind: PrincipalKind
    id: str
    scopes: frozenset[str] = frozenset()
    display_name: str = ""
    institution: str | None = None
    relationship: str | None = None
    jti: str | None = None
    study_uids: frozenset[str] | None = None
    instance_uids: frozenset[str] | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    credential: str | None = None
    expires_at: datetime | None = None

    def has(self, scope: Scope | str) -> bool:
        return Scope.ADMIN.value in self.scopes or str(scope) in self.scopes

    def require(self, scope: Scope | str) -> None:
        """Raise :class:`Forbidden` unless the principal holds ``scope``."""
        if not self.has(scope):
            raise Forbidden(f"this credential lacks the {scope} scope")

    @property
    def restricted(self) -> bool:
        return self.study_uids is not None or self.instance_uids is not None

    def may_see_study(self, study_uid: str) -> bool:
        return self.study_uids is None or study_uid in self.study_uids

    def may_see_instance(self, study_uid: str, sop_instance_uid: str) -> bool:
        return self.may_see_study(study_uid) and (
            self.instance_uids is None or sop_instance_uid in self.instance_uids
        )

    @property
    def audit_name(self) -> str:
        """How the access trail names this principal (never a token)."""
        return f"{self.kind.value}:{self.id}"


DEMO_PRINCIPAL = Principal(
    kind=PrincipalKind.DEMO, id="anonymous",
    scopes=frozenset({Scope.DICOMWEB_READ.value, Scope.DICOMWEB_WRITE.value}),
    display_name="local demo user",
)


class AccessPolicy(Protocol):
    """Resolves a viewer-session cookie to a principal (implemented by ``viewer_links``).

    Implementations re-check the link's rules (confidentiality level, DSP creation date,
    revocation) on every call, so a change takes effect at once.
    """

    cookie_name: str

    def principal_for_session(self, session_id: str, address: str) -> Principal | None:
        """The principal of a live session, or ``None`` if unknown, expired or now refused."""
        ...


class NoSessions:
    """The policy used when no viewer front end is mounted: no cookie grants anything."""

    cookie_name = "gw_session"

    def principal_for_session(self, session_id: str, address: str) -> Principal | None:
        return None
