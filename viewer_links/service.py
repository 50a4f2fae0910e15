"""Viewer links: mint, revoke, open (exchange for a viewer session) and re-check on every request.

:class:`LinkService` is the ``AccessPolicy`` the composition root injects into the DICOMweb
front end: :meth:`LinkService.principal_for_session` re-checks, on every request, that the
session is alive, that its link is not revoked, and that the DSP rules
(:func:`gateway.confidentiality.decide`) still admit the viewer with the study's *current*
confidentiality level and the patient's *current* DSP creation date.

The registry, the sessions and the facts the rules read are the core's
(:mod:`gateway.viewer_registry`); this module decides. Each unit of work runs in one transaction
(``ViewerRegistry.write``); each refusal and each success is recorded in the access trail in the
same transaction as its effect (a use counted, a session created). Tokens are never stored or
logged: links are known by their ``jti``, sessions by the SHA-256 of their id.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import jwt

from gateway import audit
from gateway.access import Principal, PrincipalKind, Scope
from gateway.auth import Authenticator
from gateway.confidentiality import Level, Relationship, decide, normalise_date
from gateway.core import Gateway
from gateway.errors import Forbidden, NotFound, Unprocessable
from gateway.uids import is_valid_uid, validate_uid
from gateway.viewer_registry import LinkRecord, RegistryUnit, ViewerRegistry, aware
from viewer_links.keys import (
    KeyRing,
    LinkError,
    LinkExpired,
    LinkRevoked,
    LinkUsedUp,
    MalformedLink,
    PolicyRefused,
    StudyUnavailable,
    signed_claims,
)
from viewer_links.refusals import UnverifiedRefusals
from viewer_links.settings import LinkSettings

logger = logging.getLogger(__name__)

VIEWER_PATH = "/viewer"
IID_RELATIONSHIP = "api"  # sessions opened by an IHE IID launch of an API principal
MAX_SESSION_ID = 128
UNVERIFIED_ACTOR = "unverified link"  # the trail's actor of refusals of unverifiable links


class InvalidLinkRequest(Unprocessable):
    """A mint request is malformed (HTTP 422); the message names the field."""


class NoKeyImages(InvalidLinkRequest):
    """``key_images_only`` was asked for a study without Key Object Selection documents."""


@dataclass(frozen=True)
class MintRequest:
    """What the portal asks for (``POST /api/links`` body, DESIGN.md)."""

    study: str
    viewer_id: str
    viewer_name: str
    relationship: str
    ttl: int | None = None
    key_images_only: bool = False
    max_uses: int | None = None


@dataclass(frozen=True)
class MintedLink:
    url: str
    jti: str
    expires_at: datetime
    token: str

    def __repr__(self) -> str:  # the token is a credential: never in a repr or a log
        return f"MintedLink(jti={self.jti!r}, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True)
class OpenedSession:
    """A viewer session created by opening a link: the cookie value and where to go."""

    session_id: str
    expires_at: datetime
    study_uid: str
    jti: str
    redirect: str

    def __repr__(self) -> str:
        return f"OpenedSession(jti={self.jti!r}, study_uid={self.study_uid!r})"


def hash_session_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _principal_name(by: Principal | str) -> str:
    return by.audit_name if isinstance(by, Principal) else by


def viewer_url(study_uid: str, keys: Sequence[tuple[str, str]] = ()) -> str:
    """The OHIF URL of a study, opened on its key images when given (series, instance) pairs."""
    params = {"StudyInstanceUIDs": study_uid}
    if keys:
        series = list(dict.fromkeys(s for s, _ in keys))
        params["SeriesInstanceUIDs"] = ",".join(series)
        params["initialSOPInstanceUID"] = keys[0][1]
    return f"{VIEWER_PATH}?{urlencode(params, safe=',')}"


class LinkService:
    """Viewer links and sessions over one gateway's index (the ``AccessPolicy`` too).

    Parameters
    ----------
    gateway
        The core (index, settings).
    settings, keys
        From :func:`viewer_links.settings.link_settings`.
    """

    def __init__(self, gateway: Gateway, settings: LinkSettings, keys: KeyRing) -> None:
        self.gateway = gateway
        self.index = gateway.index
        self.registry = ViewerRegistry(gateway.index)
        self.authenticator = Authenticator(gateway.index, gateway.settings)
        self.refusals = UnverifiedRefusals(settings.refusal_window,
                                           settings.max_unverified_refusals)
        self.settings = settings
        self.keys = keys
        self.cookie_name = settings.cookie_name

    # -- the rules -------------------------------------------------------------------------
    def _check(self, unit: RegistryUnit, study_uid: str, relationship: str,
               viewer_id: str) -> str | None:
        """Apply the DSP rules to a study as it is now; return the patient's ID."""
        row = unit.study(study_uid)
        if row is None:
            raise StudyUnavailable("the study is not in the archive")
        decision = decide(relationship, row.confidentiality, study_date=row.study_date,
                          dsp_created=row.dsp_created, viewer_id=viewer_id, author=row.author)
        if not decision:
            assert decision.reason is not None
            raise PolicyRefused(decision.detail, decision.reason.value)
        return str(row.patient_id)

    # -- mint --------------------------------------------------------------------------------
    def validate(self, request: MintRequest) -> MintRequest:
        validate_uid(request.study, "study")
        if request.relationship not in set(Relationship):
            raise InvalidLinkRequest(
                f"relationship {request.relationship!r} is not one of "
                f"{', '.join(r.value for r in Relationship)}")
        if not request.viewer_id or len(request.viewer_id) > 128:
            raise InvalidLinkRequest("viewer.id is required (at most 128 characters)")
        if len(request.viewer_name) > 200:
            raise InvalidLinkRequest("viewer.name is at most 200 characters")
        ttl = self.settings.default_ttl if request.ttl is None else request.ttl
        if not 0 < ttl <= self.settings.max_ttl:
            raise InvalidLinkRequest(
                f"ttl must be between 1 and {self.settings.max_ttl} seconds, not {ttl}")
        limit = self.settings.max_uses_limit
        if request.max_uses is not None and not 0 < request.max_uses <= limit:
            raise InvalidLinkRequest(
                f"max_uses must be null or between 1 and {self.settings.max_uses_limit}")
        return MintRequest(request.study, request.viewer_id, request.viewer_name,
                           request.relationship, ttl, request.key_images_only, request.max_uses)

    def mint(self, request: MintRequest, *, by: Principal | str, base_url: str,
             address: str = "") -> MintedLink:
        """Check the rules, register and sign a link (``POST /api/links``).

        Raises
        ------
        InvalidLinkRequest, NoKeyImages
            A malformed request (422).
        StudyUnavailable, PolicyRefused
            No such study (404); the DSP rules refuse this viewer (403). Both are audited.
        """
        request = self.validate(request)
        assert request.ttl is not None
        issued = datetime.now(UTC).replace(microsecond=0)
        expires = issued + timedelta(seconds=request.ttl)
        jti = uuid.uuid4().hex
        actor = _principal_name(by)

        def work(unit: RegistryUnit) -> LinkError | InvalidLinkRequest | None:
            try:
                self._check(unit, request.study, request.relationship, request.viewer_id)
            except PolicyRefused as exc:
                unit.audit(audit.Action.LINK_MINT, outcome=audit.Outcome.MINOR_FAILURE,
                           actor=actor, study_uid=request.study, address=address,
                           relationship=request.relationship,
                           detail=f"refused ({exc.rule}) for viewer {request.viewer_id}")
                return exc
            except StudyUnavailable as exc:
                return exc
            if request.key_images_only and not unit.key_images(request.study):
                return NoKeyImages("the study has no Key Object Selection document naming "
                                   "key images; mint a link to the whole study instead")
            unit.add_link(LinkRecord(
                jti=jti, kid=self.keys.signing_key.kid, study_instance_uid=request.study,
                viewer_id=request.viewer_id, viewer_name=request.viewer_name,
                viewer_relationship=request.relationship,
                key_images_only=request.key_images_only, max_uses=request.max_uses, uses=0,
                issued_at=issued, expires_at=expires, revoked_at=None, minted_by=actor[:200],
            ))
            unit.audit(audit.Action.LINK_MINT, actor=actor, study_uid=request.study,
                       relationship=request.relationship, address=address, jti=jti,
                       detail=f"link for viewer {request.viewer_id}, expires "
                              f"{expires.isoformat()}"
                              + (", key images only" if request.key_images_only else ""))
            return None

        error = self.registry.write(work)
        if error is not None:
            raise error
        claims: dict[str, Any] = {
            "iss": self.keys.issuer, "aud": self.keys.audience, "sub": request.viewer_id,
            "name": request.viewer_name, "rel": request.relationship, "study": request.study,
            "kio": request.key_images_only, "iat": int(issued.timestamp()),
            "nbf": int(issued.timestamp()), "exp": int(expires.timestamp()), "jti": jti,
        }
        if request.max_uses is not None:
            claims["max_uses"] = request.max_uses
        token = self.keys.sign(claims)
        logger.info("link %s minted for study %s by %s", jti, request.study, actor)
        return MintedLink(f"{base_url.rstrip('/')}/view/{token}", jti, expires, token)

    # -- revoke and list ---------------------------------------------------------------------
    def revoke(self, jti: str, *, by: Principal | str, address: str = "") -> bool:
        """Revoke a link by its ``jti``; its open sessions stop at their next request.

        Any ``jti`` can be revoked, registered or not: a link a portal signed is registered
        only when first opened, and a revocation made before then refuses it when it comes.
        Returns whether a registered link was revoked.

        Raises
        ------
        NotFound
            The ``jti`` is longer than any link's can be (64 characters).
        """
        actor = _principal_name(by)
        if not 0 < len(jti) <= 64:
            raise NotFound(f"no link with jti {jti[:64]!r}")

        def work(unit: RegistryUnit) -> bool:
            link = unit.revoke(jti, datetime.now(UTC), by=actor)
            unit.audit(audit.Action.LINK_REVOKE, actor=actor, address=address, jti=jti,
                       study_uid=link.study_instance_uid if link else None,
                       detail="link revoked" if link else "link revoked before its first use")
            return link is not None

        registered = self.registry.write(work)
        logger.info("link %s revoked by %s", jti, actor)
        return registered

    def list_links(self, *, study: str | None = None, active: bool = False) -> list[LinkRecord]:
        """The registry, newest first (``GET /api/links``, ``links list``)."""
        return self.registry.links(study=study, active=active)

    # -- open --------------------------------------------------------------------------------
    def _claims(self, token: str) -> tuple[dict[str, Any], str]:
        claims = self.keys.verify(token)
        kid = str(jwt.get_unverified_header(token)["kid"])
        study, rel, sub, jti = (claims.get(k) for k in ("study", "rel", "sub", "jti"))
        if not (isinstance(study, str) and is_valid_uid(study)):
            raise MalformedLink("the link names no valid study")
        if rel not in set(Relationship):
            raise MalformedLink("the link names no known relationship")
        if not (isinstance(sub, str) and 0 < len(sub) <= 128):
            raise MalformedLink("the link names no viewer")
        if not (isinstance(jti, str) and 0 < len(jti) <= 64):
            raise MalformedLink("the link has no usable jti")
        max_uses = claims.get("max_uses")
        if max_uses is not None and (not isinstance(max_uses, int) or max_uses < 1):
            raise MalformedLink("max_uses must be a positive integer")
        start = claims.get("iat", claims["nbf"])
        if not isinstance(start, int | float) or claims["exp"] - start > self.settings.max_ttl:
            raise MalformedLink(f"the link lives longer than the {self.settings.max_ttl} s allowed")
        return claims, kid

    def open(self, token: str, *, address: str = "") -> OpenedSession:
        """Verify a link, apply the rules, count the use and create a viewer session.

        The session ends ``session_ttl`` after it opens or when the link expires, whichever
        comes first; a link past its ``exp`` opens none, whatever the verification leeway.
        Every outcome is audited; the token itself never is.

        Raises
        ------
        LinkError
            Each refusal as its own subclass (unknown kid, bad signature, expired, not yet
            valid, wrong audience, revoked, used up, policy, study unavailable).
        """
        try:
            claims, kid = self._claims(token)
        except LinkError as exc:
            # A genuine link refused for its time or audience still names its patient's study.
            signed = signed_claims(self.keys, token)
            if signed is None:
                # Not signed by a key we know: no link, no patient. Counted per address and
                # written as one trail entry per window (viewer_links.refusals).
                self.refusals.note(address, exc.reason)
                logger.info("unverifiable link refused from %s: %s", address, exc.reason)
                raise
            study = signed.get("study")
            jti = signed.get("jti")
            audit.record(self.index, audit.Action.LINK_REFUSE,
                         outcome=audit.Outcome.MINOR_FAILURE,
                         actor=f"viewer:{signed.get('sub')}",
                         relationship=str(signed.get("rel"))[:32],
                         study_uid=study if isinstance(study, str) and is_valid_uid(study)
                         else None,
                         jti=jti[:64] if isinstance(jti, str) else None,
                         address=address, detail=f"refused: {exc.reason}")
            logger.info("link refused from %s: %s", address, exc.reason)
            raise
        jti, study, rel, viewer = claims["jti"], claims["study"], claims["rel"], claims["sub"]
        name = str(claims.get("name", ""))[:200]
        actor = f"viewer:{viewer}"
        session_id = secrets.token_urlsafe(32)
        now = datetime.now(UTC)

        def work(unit: RegistryUnit) -> OpenedSession | LinkError:
            link = unit.link(jti, for_update=True)
            if link is None:  # a portal-signed link, seen for the first time
                revoked = unit.revocation(jti)
                link = LinkRecord(
                    jti=jti, kid=kid, study_instance_uid=study, viewer_id=viewer,
                    viewer_name=name, viewer_relationship=rel,
                    key_images_only=bool(claims.get("kio")), max_uses=claims.get("max_uses"),
                    uses=0, issued_at=datetime.fromtimestamp(claims.get("iat", claims["nbf"]), UTC),
                    expires_at=datetime.fromtimestamp(claims["exp"], UTC), revoked_at=revoked,
                    minted_by=f"portal:{kid}",
                )
                unit.add_link(link)
            link_expires = min(aware(link.expires_at),
                               datetime.fromtimestamp(claims["exp"], UTC))
            error: LinkError | None = None
            patient_id: str | None = None
            keys: list[tuple[str, str]] = []
            if link.kid != kid or link.study_instance_uid != study or link.viewer_id != viewer:
                # a jti names one link: another key or study under it is not that link
                error = MalformedLink("the link's jti is already used by another link")
            elif link.revoked_at is not None:
                error = LinkRevoked("the link has been revoked")
            elif now >= link_expires:
                # The leeway tolerates clock skew in verifying a token, but no session opens
                # past the link's exp: it could only end at once or outlive the link.
                error = LinkExpired("the link has expired")
            elif link.max_uses is not None and link.uses >= link.max_uses:
                error = LinkUsedUp(f"the link has been used {link.uses} times, its limit")
            else:
                try:
                    patient_id = self._check(unit, study, rel, viewer)
                    if link.key_images_only:
                        keys = [(k.series_instance_uid, k.sop_instance_uid)
                                for k in unit.key_images(study)]
                        if not keys:
                            error = StudyUnavailable("the study has no key images any more")
                except LinkError as exc:
                    error = exc
            if error is not None:
                detail = f"refused: {error.reason}"
                if isinstance(error, PolicyRefused):
                    detail += f" ({error.rule})"
                unit.audit(audit.Action.LINK_REFUSE, outcome=audit.Outcome.MINOR_FAILURE,
                           actor=actor, actor_name=name, relationship=rel, study_uid=study,
                           patient_id=patient_id, address=address, jti=jti, detail=detail)
                return error
            uses = unit.count_use(jti)
            expires = min(now + timedelta(seconds=self.settings.session_ttl), link_expires)
            unit.open_session(hash_session_id(session_id), jti, study,
                              [uid for _, uid in keys] if link.key_images_only else None,
                              address=address, created_at=now, expires_at=expires)
            unit.audit(audit.Action.LINK_OPEN, actor=actor, actor_name=name,
                       relationship=rel, study_uid=study, patient_id=patient_id, address=address,
                       jti=jti, instance_uids=[uid for _, uid in keys] if keys else None,
                       detail=f"viewer session opened (use {uses}"
                              + (f" of {link.max_uses})" if link.max_uses else ")"))
            return OpenedSession(session_id, expires, study, jti, viewer_url(study, keys))

        result = self.registry.write(work)
        if isinstance(result, LinkError):
            logger.info("link %s refused from %s: %s", jti, address, result.reason)
            raise result
        logger.info("link %s opened from %s for study %s", jti, address, study)
        return result

    def flush_refusals(self, *, everything: bool = False) -> int:
        """Write the ended windows of unverifiable-link refusals to the trail (all of them when
        ``everything``, at shutdown): one entry per address and window. Returns how many."""
        closed = self.refusals.drain(everything=everything)
        if not closed:
            return 0

        def work(unit: RegistryUnit) -> None:
            for window in closed:
                unit.audit(audit.Action.LINK_REFUSE, outcome=audit.Outcome.MINOR_FAILURE,
                           actor=UNVERIFIED_ACTOR, address=window.address,
                           detail=window.detail)

        self.registry.write(work)
        return len(closed)

    def open_iid(self, principal: Principal, study: str, *, key_images_only: bool,
                 address: str = "") -> OpenedSession:
        """IHE IID launch: a viewer session for an authenticated API principal.

        The session is bound to the principal's credential: it ends when the credential does
        (a JWT's ``exp``) and is refused from the first request after the credential is revoked
        (an API key) or its key removed (a JWT's ``kid``), besides ``session_ttl``.

        Raises
        ------
        gateway.errors.Forbidden
            The principal lacks ``dicomweb:read`` or may not see the study.
        StudyUnavailable
            No such study, or no key images when asked for them.
        """
        principal.require(Scope.DICOMWEB_READ)
        validate_uid(study, "studyUID")
        if not principal.may_see_study(study) or principal.credential is None:
            raise Forbidden("this credential may not see the study")
        jti = "iid-" + uuid.uuid4().hex
        session_id = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.settings.session_ttl)
        if principal.expires_at is not None:
            expires = min(expires, principal.expires_at)
        if expires <= now:
            raise Forbidden("the credential has expired")

        def work(unit: RegistryUnit) -> OpenedSession | LinkError:
            if not unit.study_exists(study):
                return StudyUnavailable("the study is not in the archive")
            keys = ([(k.series_instance_uid, k.sop_instance_uid)
                     for k in unit.key_images(study)] if key_images_only else [])
            if key_images_only and not keys:
                return StudyUnavailable("the study has no key images")
            if principal.instance_uids is not None:
                keys = [k for k in keys if k[1] in principal.instance_uids]
            unit.add_link(LinkRecord(
                jti=jti, kid="iid", study_instance_uid=study, viewer_id=principal.id[:128],
                viewer_name=principal.display_name[:200], viewer_relationship=IID_RELATIONSHIP,
                key_images_only=key_images_only, max_uses=1, uses=1, issued_at=now,
                expires_at=expires, revoked_at=None, minted_by=principal.audit_name[:200],
                credential=principal.credential,
            ))
            unit.open_session(hash_session_id(session_id), jti, study,
                              [u for _, u in keys] if key_images_only else None,
                              address=address, created_at=now, expires_at=expires)
            unit.audit(audit.Action.LINK_OPEN, principal=principal, study_uid=study,
                       address=address, jti=jti, detail="IHE IID launch")
            return OpenedSession(session_id, expires, study, jti, viewer_url(study, keys))

        result = self.registry.write(work)
        if isinstance(result, LinkError):
            raise result
        return result

    # -- the AccessPolicy --------------------------------------------------------------------
    def principal_for_session(self, session_id: str, address: str) -> Principal | None:
        """The principal of a live viewer session, the rules re-checked now; else ``None``.

        A link's session: the link neither revoked nor expired, the DSP rules still admitting
        its viewer. An IID launch's session: its bearer credential still accepted.
        """
        if not session_id or len(session_id) > MAX_SESSION_ID:
            return None

        def work(unit: RegistryUnit) -> tuple[LinkRecord, str, frozenset[str] | None] | None:
            row = unit.live_session(hash_session_id(session_id))
            if row is None:
                return None
            viewer_session, link = row
            now = datetime.now(UTC)
            if viewer_session.expires_at <= now or link.expires_at <= now or link.revoked_at:
                return None
            study = viewer_session.study_instance_uid
            if link.viewer_relationship != IID_RELATIONSHIP:
                try:
                    self._check(unit, study, link.viewer_relationship, link.viewer_id)
                except LinkError:
                    return None
            return link, study, viewer_session.instance_uids

        found = self.registry.read(work)
        if found is None:
            return None
        link, study, instances = found
        if (link.viewer_relationship == IID_RELATIONSHIP
                and not self.authenticator.credential_alive(link.credential)):
            return None  # the launch's credential was revoked or its key removed
        return Principal(
            kind=PrincipalKind.VIEWER_SESSION, id=link.viewer_id,
            scopes=frozenset({Scope.DICOMWEB_READ.value}), display_name=link.viewer_name,
            relationship=(None if link.viewer_relationship == IID_RELATIONSHIP
                          else link.viewer_relationship),
            jti=link.jti, study_uids=frozenset({study}), instance_uids=instances,
        )

    # -- the portal's settings ---------------------------------------------------------------
    def set_confidentiality(self, study_uid: str, level: str, *, author: str | None,
                            keep_author: bool, by: Principal | str, address: str = "") -> None:
        """Set a study's confidentiality level (and author); effective at the next request.

        Raises
        ------
        InvalidUID, InvalidLinkRequest, NotFound
        """
        validate_uid(study_uid, "study")
        if level not in set(Level):
            raise InvalidLinkRequest(
                f"level {level!r} is not one of {', '.join(v.value for v in Level)}")
        if author is not None and not (0 < len(author) <= 128):
            raise InvalidLinkRequest("author is at most 128 characters")
        if not self.registry.set_confidentiality(study_uid, level, author=author,
                                                 keep_author=keep_author,
                                                 actor=_principal_name(by), address=address):
            raise NotFound(f"no study {study_uid} in the archive")

    def set_dsp_created(self, patient_id: str, created: str, *, by: Principal | str,
                        address: str = "", issuer: str = "") -> str:
        """Record the date the patient's DSP was created; return it as ``YYYYMMDD``.

        A fact about the patient identity (``patient_id``, ``issuer``; an empty issuer for
        any issuer), recorded whether or not a study of the patient is stored yet
        (:mod:`gateway.patients`).

        Raises
        ------
        InvalidLinkRequest
        """
        try:
            date = normalise_date(created)
        except ValueError as exc:
            raise InvalidLinkRequest(f"created: {exc}") from None
        if not (0 < len(patient_id) <= 64):
            raise InvalidLinkRequest("the patient ID is 1 to 64 characters")
        if len(issuer) > 64:
            raise InvalidLinkRequest("the issuer of the patient ID is at most 64 characters")
        self.registry.set_dsp_created(patient_id, date, actor=_principal_name(by),
                                      address=address, issuer=issuer)
        return date


__all__ = ["InvalidLinkRequest", "LinkService", "MintRequest", "MintedLink", "NoKeyImages",
           "OpenedSession", "hash_session_id", "viewer_url"]
