"""pynetdicom's timing, worked around for the associations it runs.

pynetdicom's DUL thread polls its queues and sleeps ``_run_loop_delay`` (1 ms) whenever it found
nothing to do, reads the socket in 4 KiB chunks and, while it has something to send, does not
read. These functions shorten the poll while an operation runs, read into one buffer
(:func:`dimse.transport.install_fast_recv`), and pace a generator's responses so that a
C-CANCEL is read in time. The associations :mod:`dimse.loop` runs need none of this.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dimse.transport import install_fast_recv, tune_socket

POLL_SECONDS = 0.0002


def tune_connection(assoc: Any) -> None:
    """Tune a new connection's socket before any PDU is read (``EVT_CONN_OPEN``)."""
    association_socket = assoc.dul.socket
    if association_socket is not None and association_socket.socket is not None:
        tune_socket(association_socket.socket)
        install_fast_recv(association_socket)


def tune_requestor(event: Any) -> None:
    """``EVT_CONN_OPEN`` of an association the gateway requests through pynetdicom (a move
    destination it cannot reach with :class:`~dimse.loop.storage_scu.StorageRequestor`): tuned,
    and polled at the short delay for its short life."""
    tune_connection(event.assoc)
    shorten_poll(event.assoc)


def shorten_poll(assoc: Any) -> None:
    """Poll the connection every 0.2 ms instead of pynetdicom's 1 ms.

    pynetdicom's DUL thread sleeps ``_run_loop_delay`` whenever it found nothing to do: each
    P-DATA PDU of a C-STORE sub-operation, each Pending response of a C-FIND, then waits up to
    that long. An idle association polling at 0.2 ms costs ~13% of a core (pynetdicom's 1 ms,
    ~5%), so the short delay is used only while an operation runs (:func:`busy`) and on the
    short-lived association of a move.
    """
    if hasattr(assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = POLL_SECONDS


@contextmanager
def busy(assoc: Any) -> Iterator[None]:
    """Shorten the association's poll delay for the duration of one operation."""
    dul = assoc.dul
    previous = getattr(dul, "_run_loop_delay", None)
    shorten_poll(assoc)
    try:
        yield
    finally:
        if previous is not None:
            dul._run_loop_delay = previous


def wait_until_sent(assoc: Any, timeout: float = 30.0) -> None:
    """Let the DUL send what is queued before the next Pending response is queued.

    pynetdicom's DUL thread reads the socket only in a loop turn with nothing to send, and
    the handler's generator can queue every response of a large result at once: a C-CANCEL
    (PS3.7 9.3.2.3) would then be read only after the last match was sent. Waiting for the
    queue to drain gives the DUL turns to read, so a cancel takes effect within a response or
    two, and a large result is not held in memory as queued PDUs.
    """
    outgoing = assoc.dul.to_provider_queue
    deadline = time.monotonic() + timeout
    while not outgoing.empty() and assoc.is_established and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
