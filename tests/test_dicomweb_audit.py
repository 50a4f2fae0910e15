"""Every DICOMweb access reaches the audit sink (PS3.15 A.5 event kinds), without tokens."""

from __future__ import annotations

import threading

from gateway.audit import Action, AuditEvent
from tests.support.common import LiveServer, ct_dataset
from tests.support.dicomweb_helpers import api_key, client, load_corpus


class ListSink:
    """An :class:`~gateway.audit.AuditSink` keeping the events (the shape viewer_links gives)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.lock = threading.Lock()

    def record(self, event: AuditEvent) -> None:
        with self.lock:
            self.events.append(event)


def test_accesses_are_recorded(gateway) -> None:  # noqa: ANN001
    sink = ListSink()
    gateway.audit = sink  # every front end records through gateway.audit
    with LiveServer(gateway) as live:
        c = load_corpus(gateway)
        token = api_key(gateway, "ops", "admin")
        dw = client(live.http_url, token)
        dw.search_for_studies(search_filters={"PatientID": "P-002"})
        dw.retrieve_series_metadata(c.study_a, c.series_a_ct)
        dw.retrieve_study(c.study_c)
        dw.store_instances([ct_dataset(0, study="1.2.826.0.1.3680043.8.498.66")])
        dw.delete_study(c.study_b)
    actions = [(e.action, e.study_uids) for e in sink.events]
    assert actions == [
        (Action.QUERY, (c.study_b,)),
        (Action.RETRIEVE, (c.study_a,)),
        (Action.TRANSFER, (c.study_c,)),
        (Action.STORE, ("1.2.826.0.1.3680043.8.498.66",)),
        (Action.DELETE, (c.study_b,)),
    ]
    # The search's matches name their patients: the trail needs no lookup for them.
    assert sink.events[0].patients == ((c.study_b, "P-002"),)
    for event in sink.events:
        assert event.principal == "api_key:ops" and event.address == "127.0.0.1"
        assert token not in repr(event)
