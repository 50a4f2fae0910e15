"""Events: an outbox in the index, a stable-study scan, webhook delivery and a change feed.

What is announced (docs/events.md has the bodies):

- ``study.stable``: a study has had no new instance for ``[events] stable_seconds``;
- ``study.updated``: a study announced before changed (more instances, or some deleted or
  rejected), announced after the same quiet time;
- ``study.deleted``: a study's last instance was deleted (or rejected): the study is gone;
- ``instances.rejected``: an IHE IOCM rejection note took instances of a study out.

How nothing is lost and nothing is announced that was not committed:

1. An event is a row of ``event`` (the outbox), inserted in the transaction of the change that
   causes it: the delete (:func:`gateway.instances.remove_instances`), the rejection
   (:func:`gateway.rejection.reject`), or the scan's own announcement. Its ``seq`` is never
   reused (SQLite ``AUTOINCREMENT``, a PostgreSQL sequence); on PostgreSQL the inserting
   transactions take one advisory lock, so that events commit in ``seq`` order and a reader of
   the change feed never sees ``seq`` 7 before ``seq`` 6 is visible.
2. Storing an instance writes nothing for events (the C-STORE hot path stays one statement).
   The scan (:func:`discover`) reads the instances added since its cursor (``instance.pk >
   cursor``, a range of the primary key) and keeps, per study, the newest instance seen and
   its ``created_at`` (``event_study``), marking the study pending. The cursor is advanced
   in the same transaction, so a study whose instance arrived just before a crash is found
   again after the restart. On SQLite, writers take turns, so the primary key follows the
   commit order; a delete moves the cursor back to the largest key left (SQLite may give a
   deleted largest key again). On PostgreSQL, whose sequences may commit out of order across
   nodes, the cursor stays behind the instances of the last :data:`PG_COMMIT_LAG` seconds,
   which are read again (idempotently).
3. :func:`announce` takes the pending studies whose newest instance is older than the quiet
   time and, for each, sets it announced by a conditional update (``WHERE pending AND
   last_instance_pk = <seen>``) and inserts its event in the same transaction: when two nodes
   run the scan at once, one update wins and one event is written.
4. Deliveries: for each webhook, a cursor over the outbox; :func:`fan_out` adds one
   ``event_delivery`` row per new event. :func:`claim` takes due deliveries (``FOR UPDATE SKIP
   LOCKED`` on PostgreSQL: each is claimed by one node), never one whose study has an earlier
   delivery not yet acknowledged (in order per study), and leases them (``next_attempt_at``
   moved past the send's timeout, so a node that dies mid-send leaves it to be retried).
   :func:`settle` records the answer: any 2xx acknowledges; anything else, or no answer in
   ``delivery_timeout``, is retried after 1, 2, 4... seconds up to ``retry_max_seconds``,
   with no limit on attempts. Each webhook has its own task, and sends run on the event loop:
   a slow receiver holds up neither ingest nor the other receivers.

Signatures follow the Standard Webhooks specification: ``webhook-id`` (the event's id, the same
on every attempt), ``webhook-timestamp`` (seconds since the epoch, at sending) and
``webhook-signature``: ``v1,`` and the base64 of HMAC-SHA256 over ``id.timestamp.body`` keyed
with the secret's base64-decoded part.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from sqlalchemy import CursorResult, and_, delete, func, select, text, update
from sqlalchemy.orm import Session, aliased

from gateway.config import EventsSettings, Webhook
from gateway.errors import InvalidQuery
from gateway.index import Index, _insert, now
from gateway.models import (
    Event,
    EventCursor,
    EventDelivery,
    EventStudy,
    Instance,
    Patient,
    Series,
    Study,
)

logger = logging.getLogger(__name__)

STUDY_STABLE = "study.stable"
STUDY_UPDATED = "study.updated"
STUDY_DELETED = "study.deleted"
INSTANCES_REJECTED = "instances.rejected"
EVENT_TYPES = (STUDY_STABLE, STUDY_UPDATED, STUDY_DELETED, INSTANCES_REJECTED)

INSTANCES_CURSOR = "instances"
# How long a PostgreSQL transaction may take between stamping an instance and committing it
# for the scan to see it (its cursor stays this far behind).
PG_COMMIT_LAG = timedelta(seconds=30)
# The key of the advisory lock that makes events commit in seq order on PostgreSQL.
PG_EVENT_LOCK = 0x6576656E7473  # "events"
# How often the scan runs, at most (less for a short quiet time).
SCAN_INTERVAL = 0.5
# Studies announced, and events fanned out or claimed, per transaction.
SCAN_BATCH = 200
FAN_OUT_BATCH = 500
# Deliveries of one webhook in flight at once (to different studies).
DELIVERY_CONCURRENCY = 8
# The first retry waits this long; each next one twice as long, up to retry_max_seconds.
FIRST_RETRY_SECONDS = 1.0
# A claimed delivery is left to others this long after its send's timeout (node lost).
LEASE_MARGIN_SECONDS = 30.0
# The change feed's page: default and largest.
CHANGES_DEFAULT_LIMIT = 100
CHANGES_MAX_LIMIT = 1000
MEDIA_JSON = "application/json"


def _aware(value: datetime) -> datetime:
    """A timestamp read back from the index, in UTC (SQLite returns it naive)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def iso(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``.

    >>> iso(datetime(2026, 1, 5, 10, 15, tzinfo=UTC))
    '2026-01-05T10:15:00.000Z'
    """
    return _aware(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# -- the outbox ---------------------------------------------------------------------------------
def study_summary(session: Session, study_uid: str) -> dict[str, Any] | None:
    """What a study event says about a study (its ``data`` without ``seq``); ``None`` if the
    study is not stored."""
    row = session.execute(
        select(Study.pk, Study.accession_number, Study.study_date, Study.modalities_in_study,
               Patient.patient_id, Patient.issuer_of_patient_id)
        .join(Patient, Patient.pk == Study.patient_pk)
        .where(Study.study_instance_uid == study_uid)).first()
    if row is None:
        return None
    series, instances = session.execute(
        select(func.count(func.distinct(Series.pk)), func.count(Instance.pk))
        .select_from(Series).join(Instance, Instance.series_pk == Series.pk)
        .where(Series.study_pk == row.pk)).one()
    return {
        "study": study_uid,
        "patient": {"id": row.patient_id, "issuer": row.issuer_of_patient_id},
        "accession": row.accession_number,
        "study_date": row.study_date,
        "modalities": [m for m in row.modalities_in_study.split("\\") if m],
        "series": int(series or 0),
        "instances": int(instances or 0),
    }


def serialize(session: Session) -> None:
    """On PostgreSQL, take the lock that writers of events hold to their commit, so that
    events commit one transaction at a time, in seq order. A unit that will lock rows before
    it records an event takes it first (lock order: this lock, then rows)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_EVENT_LOCK})


def record(session: Session, event_type: str, study_uid: str, data: Mapping[str, Any]) -> None:
    """Insert an event into the outbox, inside the caller's unit of work.

    Parameters
    ----------
    event_type
        One of :data:`EVENT_TYPES`.
    data
        The event's ``data`` (``study`` is set from ``study_uid``; ``seq`` is added when the
        event is served).
    """
    assert event_type in EVENT_TYPES, event_type
    serialize(session)
    body = {**data, "study": study_uid}
    session.add(Event(id=f"msg_{uuid.uuid4().hex}", type=event_type,
                      study_instance_uid=study_uid, created_at=now(),
                      data=json.dumps(body, separators=(",", ":"))))
    session.flush()


def before_removal(session: Session, study_uids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The summaries of the studies instances are about to be removed from (call inside the
    unit of work, before :meth:`Index.remove_instances`; then :func:`after_removal`)."""
    summaries = {}
    for uid in sorted(set(study_uids)):
        summary = study_summary(session, uid)
        if summary is not None:
            summaries[uid] = summary
    return summaries


def after_removal(session: Session, before: Mapping[str, Mapping[str, Any]]) -> None:
    """Announce the studies that instances were removed from, in the same unit of work:
    ``study.deleted`` (with what the study held) for a study that is gone; a study still
    stored is pending again, so that its new counts are announced (``study.updated``) after
    the quiet time, if it had been announced."""
    stamp = now()
    for uid, summary in before.items():
        if session.scalar(select(Study.pk).where(Study.study_instance_uid == uid)) is None:
            record(session, STUDY_DELETED, uid, {k: v for k, v in summary.items()
                                                 if k != "study"})
            session.execute(delete(EventStudy).where(EventStudy.study_instance_uid == uid))
        else:
            session.execute(update(EventStudy).where(EventStudy.study_instance_uid == uid)
                            .values(pending=True, last_instance_at=stamp))


def record_rejection(session: Session, before: Mapping[str, Mapping[str, Any]],
                     removed: Mapping[str, list[str]], code: str, meaning: str,
                     note_uid: str) -> None:
    """``instances.rejected`` for each study a rejection note took instances out of (inside
    its unit of work, after :meth:`Index.remove_instances`), then :func:`after_removal`."""
    for uid, sops in sorted(removed.items()):
        patient = before.get(uid, {}).get("patient", {})
        record(session, INSTANCES_REJECTED, uid, {
            "patient": patient, "rejection": {"code": code, "meaning": meaning},
            "note": note_uid, "instances": sorted(sops)})
    after_removal(session, before)


# -- the stable-study scan ----------------------------------------------------------------------
def _cursor(session: Session, name: str) -> int | None:
    return session.scalar(select(EventCursor.value).where(EventCursor.name == name))


def _move_cursor(session: Session, name: str, old: int | None, new: int) -> bool:
    """Move a cursor from ``old`` to ``new`` unless another node moved it first."""
    if old is None:
        stmt = _insert(session.get_bind().dialect.name, EventCursor.__table__).values(
            name=name, value=new).on_conflict_do_nothing()
        return _changed(session.execute(stmt))
    return _changed(session.execute(
        update(EventCursor).where(EventCursor.name == name, EventCursor.value == old)
        .values(value=new)))


def _changed(result: Any) -> bool:
    """Whether a conditional statement changed a row."""
    return bool(cast(CursorResult[Any], result).rowcount)


def discover(index: Index) -> int:
    """Note the studies that received instances since the scan's cursor; return how many.

    One grouped query over the instances added since (a range of the primary key); one row
    of ``event_study`` written per such study, none per instance.
    """
    postgres = index.dialect == "postgresql"
    with index.Session() as session:  # most polls find nothing: no write, no lock taken
        cursor = _cursor(session, INSTANCES_CURSOR) or 0
        if session.scalar(select(Instance.pk).where(Instance.pk > cursor).limit(1)) is None:
            return 0

    def work(session: Session) -> int:
        cursor = _cursor(session, INSTANCES_CURSOR) or 0
        found = session.execute(
            select(Study.study_instance_uid, func.max(Instance.pk), func.max(Instance.created_at))
            .select_from(Instance).join(Series, Series.pk == Instance.series_pk)
            .join(Study, Study.pk == Series.study_pk)
            .where(Instance.pk > cursor).group_by(Study.study_instance_uid)
            .order_by(Study.study_instance_uid)).all()  # rows locked in one order on all nodes
        if not found:
            return 0
        table = EventStudy.__table__
        for uid, last_pk, last_at in found:
            stmt = _insert(index.dialect, table).values(
                study_instance_uid=uid, last_instance_pk=last_pk, last_instance_at=last_at,
                pending=True, announced=False)
            stmt = stmt.on_conflict_do_update(
                index_elements=[table.c.study_instance_uid],
                set_={"last_instance_pk": stmt.excluded.last_instance_pk,
                      "last_instance_at": stmt.excluded.last_instance_at, "pending": True},
                where=table.c.last_instance_pk < stmt.excluded.last_instance_pk)
            session.execute(stmt)
        if postgres:  # keep the instances of the last PG_COMMIT_LAG seconds ahead
            newest = session.scalar(select(func.max(Instance.pk)).where(
                Instance.pk > cursor, Instance.created_at < now() - PG_COMMIT_LAG))
        else:
            newest = max(row[1] for row in found)
        if newest is not None and newest > cursor:
            _move_cursor(session, INSTANCES_CURSOR, _cursor(session, INSTANCES_CURSOR), newest)
        return len(found)

    # Not flushed at once: after a power failure that loses it, the scan reads the same
    # instances again (their rows are flushed with the ingest's, by Index.flush).
    return index.write(work, durable=False)


def announce(index: Index, stable_seconds: float) -> int:
    """Announce the pending studies quiet for ``stable_seconds``; return how many events."""
    cutoff = now() - timedelta(seconds=stable_seconds)
    with index.Session() as session:
        due = session.execute(
            select(EventStudy.study_instance_uid, EventStudy.last_instance_pk)
            .where(EventStudy.pending.is_(True), EventStudy.last_instance_at <= cutoff)
            .order_by(EventStudy.last_instance_at).limit(SCAN_BATCH)).all()
    if not due:
        return 0

    def work(session: Session) -> int:
        serialize(session)  # before the rows: two nodes announcing never wait on each other
        recorded = 0
        for uid, last_pk in sorted(due):  # rows locked in the order discover() locks them
            announced = session.scalar(select(EventStudy.announced).where(
                EventStudy.study_instance_uid == uid))
            won = _changed(session.execute(
                update(EventStudy).where(EventStudy.study_instance_uid == uid,
                                         EventStudy.pending.is_(True),
                                         EventStudy.last_instance_pk == last_pk)
                .values(pending=False, announced=True)))
            if not won:
                continue  # another node announced it, or an instance arrived since
            summary = study_summary(session, uid)
            if summary is None:  # deleted since (and announced as such)
                continue
            record(session, STUDY_UPDATED if announced else STUDY_STABLE, uid,
                   {k: v for k, v in summary.items() if k != "study"})
            recorded += 1
        return recorded

    return index.write(work)


def next_quiet(index: Index, stable_seconds: float) -> datetime | None:
    """When the next pending study becomes quiet (the scan sleeps until then), if any."""
    with index.Session() as session:
        oldest = session.scalar(select(func.min(EventStudy.last_instance_at)).where(
            EventStudy.pending.is_(True)))
    return None if oldest is None else _aware(oldest) + timedelta(seconds=stable_seconds)


# -- deliveries ---------------------------------------------------------------------------------
def shown(url: str) -> str:
    """A receiver's URL as logged: without user information or query, which may hold a
    credential.

    >>> shown("https://user:pw@portal.example:8443/hooks/imaging?token=x")
    'https://portal.example:8443/hooks/imaging'
    """
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def webhook_key(url: str) -> str:
    """The name a webhook's deliveries and cursor are kept under: a digest of its URL.

    >>> webhook_key("https://portal.example/hooks/imaging")
    '2e5cf46fd2b5b6e188c211514e2112b4'
    """
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def start_webhook(index: Index, key: str) -> None:
    """Give a webhook its outbox cursor if it has none: a receiver configured now gets the
    events from now on, not the history (the change feed has that)."""
    name = f"webhook:{key}"

    def work(session: Session) -> None:
        if _cursor(session, name) is None:
            last = session.scalar(select(func.max(Event.seq))) or 0
            _move_cursor(session, name, None, last)

    index.write(work)


def fan_out(index: Index, key: str) -> int:
    """Add a delivery to webhook ``key`` for each event past its cursor; return how many."""
    name = f"webhook:{key}"

    def work(session: Session) -> int:
        cursor = _cursor(session, name)
        if cursor is None:
            return 0
        rows = session.execute(
            select(Event.seq, Event.study_instance_uid).where(Event.seq > cursor)
            .order_by(Event.seq).limit(FAN_OUT_BATCH)).all()
        if not rows:
            return 0
        if not _move_cursor(session, name, cursor, rows[-1].seq):
            return 0  # another node did it
        stamp = now()
        session.execute(
            _insert(index.dialect, EventDelivery.__table__).on_conflict_do_nothing(),
            [{"seq": r.seq, "webhook": key, "study_instance_uid": r.study_instance_uid,
              "attempts": 0, "next_attempt_at": stamp, "delivered_at": None,
              "last_error": ""} for r in rows])
        return len(rows)

    return index.write(work)


@dataclass(frozen=True)
class Claimed:
    """A delivery taken by this node: the event to send, and the attempt it is."""

    seq: int
    id: str
    type: str
    created_at: datetime
    data: str
    attempt: int

    def body(self) -> bytes:
        """The request body: ``{"type", "timestamp", "data": {"seq", "study", ...}}``."""
        return json.dumps({"type": self.type, "timestamp": iso(self.created_at),
                           "data": {"seq": self.seq, **json.loads(self.data)}},
                          separators=(",", ":")).encode()


def claim(index: Index, key: str, lease_seconds: float,
          limit: int = DELIVERY_CONCURRENCY) -> list[Claimed]:
    """Take up to ``limit`` due deliveries of webhook ``key``, the first of their study not
    yet acknowledged, and lease them for ``lease_seconds``."""
    earlier = aliased(EventDelivery)

    def work(session: Session) -> list[Claimed]:
        stamp = now()
        blocked = (select(earlier.seq).where(
            earlier.webhook == EventDelivery.webhook,
            earlier.study_instance_uid == EventDelivery.study_instance_uid,
            earlier.delivered_at.is_(None), earlier.seq < EventDelivery.seq).exists())
        rows = session.execute(
            select(EventDelivery.seq, EventDelivery.attempts)
            .where(EventDelivery.webhook == key, EventDelivery.delivered_at.is_(None),
                   EventDelivery.next_attempt_at <= stamp, ~blocked)
            .order_by(EventDelivery.seq).limit(limit)
            .with_for_update(skip_locked=True, of=EventDelivery)).all()
        if not rows:
            return []
        seqs = [r.seq for r in rows]
        session.execute(
            update(EventDelivery).where(EventDelivery.webhook == key,
                                        EventDelivery.seq.in_(seqs))
            .values(attempts=EventDelivery.attempts + 1,
                    next_attempt_at=stamp + timedelta(seconds=lease_seconds)))
        events = {e.seq: e for e in session.scalars(select(Event).where(Event.seq.in_(seqs)))}
        return [Claimed(r.seq, events[r.seq].id, events[r.seq].type, events[r.seq].created_at,
                        events[r.seq].data, r.attempts + 1) for r in rows]

    return index.write(work)


def retry_delay(attempt: int, retry_max_seconds: float) -> float:
    """Seconds before the next attempt after failed attempt number ``attempt`` (1-based).

    >>> [retry_delay(n, 300) for n in (1, 2, 3, 10, 30)]
    [1.0, 2.0, 4.0, 300, 300]
    """
    if attempt > 30:
        return retry_max_seconds
    return min(FIRST_RETRY_SECONDS * 2 ** (attempt - 1), retry_max_seconds)


def settle(index: Index, key: str, outcomes: list[tuple[Claimed, str | None]],
           retry_max_seconds: float) -> None:
    """Record the outcome of sends: ``None`` acknowledged, else the error, retried later."""
    def work(session: Session) -> None:
        stamp = now()
        for claimed, error in outcomes:
            where = and_(EventDelivery.webhook == key, EventDelivery.seq == claimed.seq)
            if error is None:
                values: dict[str, Any] = {"delivered_at": stamp, "last_error": ""}
            else:
                delay = retry_delay(claimed.attempt, retry_max_seconds)
                values = {"next_attempt_at": stamp + timedelta(seconds=delay),
                          "last_error": error[:500]}
            session.execute(update(EventDelivery).where(where).values(**values))

    index.write(work)


def next_due(index: Index, key: str) -> datetime | None:
    """When the next undelivered delivery of webhook ``key`` is due, if any."""
    with index.Session() as session:
        value = session.scalar(select(func.min(EventDelivery.next_attempt_at)).where(
            EventDelivery.webhook == key, EventDelivery.delivered_at.is_(None)))
    return None if value is None else _aware(value)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of Standard Webhooks: ``v1,<base64 HMAC-SHA256>`` of
    ``msg_id.timestamp.body``.

    >>> sign(b"secret-key", "msg_1", 1700000000, b'{}')
    'v1,TpMXpgJuEDtGUWHqKf6XWi0wxEzYiEcb+5b+I3hEmU4='
    """
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class WebhookClient(Protocol):
    """The HTTP client deliveries are sent with, given by the composition root (aiohttp's,
    on the server's loop: ``gateway.server.WebhookSession``); the core imports none."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str],
                   timeout: float) -> str | None:
        """POST ``body`` to ``url`` without following redirects, within ``timeout`` seconds;
        ``None`` if the receiver answered 2xx, else what went wrong (``HTTP 500``, a refused
        connection, no answer in time)."""
        ...

    async def close(self) -> None:
        ...


async def send(client: WebhookClient, hook: Webhook, claimed: Claimed,
               timeout: float) -> str | None:
    """POST one event to a webhook; ``None`` if it answered 2xx, else what went wrong."""
    body = claimed.body()
    stamp = int(time.time())
    headers = {"Content-Type": MEDIA_JSON, "webhook-id": claimed.id,
               "webhook-timestamp": str(stamp),
               "webhook-signature": sign(hook.key, claimed.id, stamp, body)}
    return await client.post(hook.url, body, headers, timeout)


# -- the change feed ----------------------------------------------------------------------------
def parse_changes_query(after: str | None, limit: str | None) -> tuple[int, int]:
    """Check ``after`` and ``limit`` of ``GET /api/changes``.

    >>> parse_changes_query("5", None)
    (5, 100)

    Raises
    ------
    InvalidQuery
        ``after`` is missing, not a whole number or negative; ``limit`` is not a whole
        number from 1 to :data:`CHANGES_MAX_LIMIT`.
    """
    try:
        start = int(after) if after is not None else 0
    except ValueError:
        raise InvalidQuery(f"after={after!r} is not a sequence number: give the seq of the "
                           "last change you have, or 0 for the first") from None
    if start < 0:
        raise InvalidQuery(f"after={start} is negative: give the seq of the last change you "
                           "have, or 0 for the first")
    try:
        count = int(limit) if limit is not None else CHANGES_DEFAULT_LIMIT
    except ValueError:
        raise InvalidQuery(f"limit={limit!r} is not a whole number") from None
    if not 1 <= count <= CHANGES_MAX_LIMIT:
        raise InvalidQuery(f"limit={count} is out of range: give 1 to {CHANGES_MAX_LIMIT}")
    return start, count


def changes(index: Index, after: int, limit: int) -> dict[str, Any]:
    """The events after ``seq`` ``after``, in seq order: ``{"changes": [...], "last": seq}``,
    ``last`` being the seq of the last change listed (``after`` when none is): the ``after``
    of the next call.

    Raises
    ------
    InvalidQuery
        ``after`` is beyond the last event recorded (a feed from another gateway, or a
        restored database: start again from 0).
    """
    with index.Session() as session:
        newest = session.scalar(select(func.max(Event.seq))) or 0
        if after > newest:
            raise InvalidQuery(f"after={after} is beyond the last change ({newest}); "
                               "start again from after=0")
        rows = session.scalars(select(Event).where(Event.seq > after)
                               .order_by(Event.seq).limit(limit)).all()
    listed = [{"type": e.type, "timestamp": iso(e.created_at),
               "data": {"seq": e.seq, **json.loads(e.data)}} for e in rows]
    return {"changes": listed, "last": rows[-1].seq if rows else after}


# -- the background service ---------------------------------------------------------------------
class EventService:
    """The scan and the webhook deliveries of one node, as tasks on the server's loop.

    Database work runs in threads (``asyncio.to_thread``); sends are requests of ``client``
    on the loop (closed by :meth:`stop`). Each loop survives its own failures (a database
    outage, a receiver's error): it logs, waits, and goes on.
    """

    def __init__(self, index: Index, settings: EventsSettings,
                 client: WebhookClient) -> None:
        self.index = index
        self.settings = settings
        self.interval = min(SCAN_INTERVAL, settings.stable_seconds / 4)
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: dict[str, asyncio.Event] = {}
        self._client = client
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        for hook in self.settings.webhooks:
            key = webhook_key(hook.url)
            await asyncio.to_thread(start_webhook, self.index, key)
            self._wake[key] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._deliver_forever(hook, key)))
        self._tasks.append(asyncio.create_task(self._scan_forever()))

    async def stop(self) -> None:
        """Stop the loops at their next step: a database call under way in a worker thread is
        waited for (cancelling the task would leave the thread running against a database
        about to be closed); a webhook send still under way after the delivery timeout is
        cancelled (its delivery, leased, is retried with the same ``webhook-id``)."""
        self._stopping.set()
        for wake in self._wake.values():
            wake.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks,
                                         timeout=self.settings.delivery_timeout + 5)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks = []
        await self._client.close()

    async def _scan_forever(self) -> None:
        stable = self.settings.stable_seconds
        while not self._stopping.is_set():
            wait = self.interval
            try:
                await asyncio.to_thread(discover, self.index)
                if await asyncio.to_thread(announce, self.index, stable):
                    for wake in self._wake.values():
                        wake.set()
                # Wake when the next study's quiet time ends, not up to an interval later.
                quiet = await asyncio.to_thread(next_quiet, self.index, stable)
                if quiet is not None:
                    wait = min(wait, max(0.01, (quiet - now()).total_seconds()))
            except Exception:
                logger.exception("event scan failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def _deliver_forever(self, hook: Webhook, key: str) -> None:
        wake = self._wake[key]
        lease = self.settings.delivery_timeout + LEASE_MARGIN_SECONDS
        while not self._stopping.is_set():
            wait = self.interval * 2
            wake.clear()
            try:
                await asyncio.to_thread(fan_out, self.index, key)
                batch = await asyncio.to_thread(claim, self.index, key, lease)
                if batch:
                    errors = await asyncio.gather(*(
                        send(self._client, hook, claimed, self.settings.delivery_timeout)
                        for claimed in batch))
                    outcomes = list(zip(batch, errors, strict=True))
                    for claimed, error in outcomes:
                        if error is not None:
                            logger.warning("webhook %s: event %s (%s) attempt %d failed: %s; "
                                           "retried", shown(hook.url), claimed.seq, claimed.type,
                                           claimed.attempt, error)
                    await asyncio.to_thread(settle, self.index, key, outcomes,
                                            self.settings.retry_max_seconds)
                    continue
                due = await asyncio.to_thread(next_due, self.index, key)
                if due is not None:
                    wait = min(wait, max(0.05, (due - now()).total_seconds()))
            except Exception:
                logger.exception("webhook %s: delivery failed; trying again", shown(hook.url))
                wait = 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)


__all__ = [
    "EVENT_TYPES",
    "EventService",
    "after_removal",
    "announce",
    "before_removal",
    "changes",
    "claim",
    "discover",
    "fan_out",
    "parse_changes_query",
    "record",
    "record_rejection",
    "settle",
    "sign",
    "study_summary",
]
