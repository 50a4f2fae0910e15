"""A-ASSOCIATE negotiation as acceptor (PS3.7 D.3.3, PS3.8 9.3.2-9.3.3), remembered per
proposal, for the associations :mod:`dimse.loop.acceptor` runs.

A storage SCU proposes the same presentation contexts on every association it opens (dcmtk's
``storescu`` 128 of them, each with its transfer syntaxes). Decoding that request into
pynetdicom's objects, ordering the supported contexts by the requestor's preference,
negotiating them and encoding the answer cost about 50 ms of interpreter time per association,
with the interpreter lock held: as much as storing about fifty small instances. The outcome
depends only on the request's bytes other than its two AE titles and on the gateway's
supported contexts, so it is kept, under a digest of those bytes, for the next association
that proposes the same; associations proposing it at the same time wait for the one computing
it. The AE titles, which the peer rules and the called-AE check judge, are read from each
request itself.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import build_context
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPDU
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dimse.loop.upper_layer import ProtocolError
from gateway.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

# User Information items an association may carry and still be run by dimse.loop.acceptor.
PLAIN_USER_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
                    ImplementationVersionNameNotification, AsynchronousOperationsWindowNegotiation,
                    SCP_SCU_RoleSelectionNegotiation)
# The Called and Calling AE Title fields of an A-ASSOCIATE-RQ, and of its A-ASSOCIATE-AC,
# which repeats them (PS3.8 Tables 9-11 and 9-17).
AE_TITLES = slice(10, 42)
# How many different proposals are kept (one or two per kind of peer).
KEPT = 32


@dataclass(frozen=True)
class Negotiated:
    """What an association request was answered: its accepted contexts and the A-ASSOCIATE-AC.

    Shared by every association that proposed the same: nothing here is changed after it
    is made.
    """

    # context ID -> (abstract syntax, transfer syntax), the accepted ones
    contexts: dict[int, tuple[str, str]]
    # The accepted contexts with the roles negotiated (C-GET sends where as_scu is true).
    accepted: tuple[PresentationContext, ...]
    # The requestor's Maximum Length Received (0: unlimited).
    peer_max_pdu: int
    # The A-ASSOCIATE-AC, its AE title fields those of the request that was negotiated
    # (each association's own: accept_pdu_for).
    accept_pdu: bytes

    def accept_pdu_for(self, request: bytes) -> bytes:
        """The A-ASSOCIATE-AC answering ``request``: its AE title fields as ``request`` sent
        them ("the same value received in the A-ASSOCIATE-RQ", PS3.8 Table 9-17)."""
        return self.accept_pdu[:AE_TITLES.start] + request[AE_TITLES] + \
            self.accept_pdu[AE_TITLES.stop:]


def own_user_information(max_pdu_size: int) -> list[
        MaximumLengthNotification | ImplementationClassUIDNotification
        | ImplementationVersionNameNotification]:
    """The User Information items the gateway sends in an A-ASSOCIATE, as acceptor or as
    requestor: its Maximum Length Received, Implementation Class UID and Version Name
    (PS3.7 D.3.3.1, D.3.3.2)."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu_size
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_length, class_uid, version]


def ae_titles(request: bytes) -> tuple[str, str] | None:
    """The Called and Calling AE Titles of an A-ASSOCIATE-RQ PDU, read as pynetdicom reads
    them (leading and trailing spaces are not significant); ``None`` when one is invalid."""
    pdu = AssociateRqPDU()
    try:
        pdu.called_ae_title = request[10:26]
        pdu.calling_ae_title = request[26:42]
    except (ValueError, TypeError):
        return None
    return str(pdu.called_ae_title).strip(), str(pdu.calling_ae_title).strip()


def contexts_in_requestor_order(requested: list[PresentationContext],
                                supported: list[PresentationContext]
                                ) -> list[PresentationContext]:
    """The supported contexts with each one's transfer syntaxes reordered to follow the order
    the requestor proposed them (its preference), keeping only the ones the gateway supports.

    pynetdicom accepts, for each proposed context, the first syntax of the *acceptor's* list;
    the gateway keeps instances as received, in the syntax the sender prefers.
    """
    proposed: dict[str, list[str]] = {}
    for context in requested:
        # With several contexts for one SOP class, the first proposal wins the ordering.
        proposed.setdefault(str(context.abstract_syntax), [str(t) for t in context.transfer_syntax])
    contexts = []
    for context in supported:
        wanted = proposed.get(str(context.abstract_syntax))
        if wanted and context.abstract_syntax is not None:
            ours = [str(t) for t in context.transfer_syntax]
            ordered = [t for t in wanted if t in ours] + [t for t in ours if t not in wanted]
            reordered = build_context(context.abstract_syntax, ordered)
            # Keep the SCP/SCU role selection the context accepts (C-GET, PS3.7 D.3.3.4).
            reordered.scu_role, reordered.scp_role = context.scu_role, context.scp_role
            context = reordered
        contexts.append(context)
    return contexts


def negotiate(request: bytes, supported: list[PresentationContext],
              max_pdu_size: int) -> Negotiated | None:
    """Negotiate an A-ASSOCIATE-RQ PDU against the supported contexts; ``None`` when the
    request cannot be run by :mod:`dimse.loop.acceptor` (malformed, no context proposed, or a
    User Information item other than :data:`PLAIN_USER_ITEMS`): pynetdicom reads and answers
    it then.

    Raises
    ------
    ProtocolError
        A presentation context item without its abstract syntax or transfer syntaxes,
        which pynetdicom decodes but cannot answer: the caller aborts the association
        (PS3.8 9.3.8, invalid PDU parameter value).
    """
    try:
        pdu = AssociateRqPDU()
        pdu.decode(request)
        primitive = pdu.to_primitive()
    except Exception:  # noqa: BLE001 - malformed: pynetdicom aborts it properly
        return None
    if not primitive.presentation_context_definition_list or not all(
            isinstance(item, PLAIN_USER_ITEMS) for item in primitive.user_information):
        return None
    proposed = primitive.presentation_context_definition_list
    for context in proposed:
        # PS3.8 9.3.2.2: each item has one Abstract Syntax sub-item and one or more Transfer
        # Syntax sub-items. pynetdicom decodes an item without them, then fails on it
        # (TypeError, IndexError), in its own acceptor as in its negotiation, leaving the
        # peer unanswered (fuzz/fuzz_pdu.py): the request is aborted here.
        if context.abstract_syntax is None:
            raise ProtocolError("a presentation context item has no abstract syntax")
        if not context.transfer_syntax:
            raise ProtocolError("a presentation context item has no transfer syntax")
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
             for item in primitive.user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
             and item.sop_class_uid is not None}
    results, role_replies = negotiate_as_acceptor(
        proposed, contexts_in_requestor_order(proposed, supported), roles or None)
    peer_max = 0
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
    reply = A_ASSOCIATE()
    reply.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    reply.calling_ae_title = primitive.calling_ae_title
    reply.called_ae_title = primitive.called_ae_title
    reply.result = 0x00
    reply.result_source = 0x01
    reply.presentation_context_definition_results_list = results
    reply.user_information = [*own_user_information(max_pdu_size), *role_replies]
    accept = AssociateAcPDU()
    accept.from_primitive(reply)
    accepted = tuple(cx for cx in results if cx.result == 0x00)
    contexts = {int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in accepted if cx.context_id is not None}
    return Negotiated(contexts, accepted, peer_max, bytes(accept.encode()))


class _Pending:
    """A negotiation being computed by one thread, waited for by the others."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Negotiated | None = None


class Negotiations:
    """The outcomes of the last :data:`KEPT` different proposals.

    Parameters
    ----------
    compute
        Negotiates a request (:func:`negotiate` with the supported contexts bound).
    """

    def __init__(self, compute: Callable[[bytes], Negotiated | None], kept: int = KEPT) -> None:
        self._compute = compute
        self._kept = kept
        self._lock = threading.Lock()
        self._known: OrderedDict[bytes, Negotiated | None | _Pending] = OrderedDict()

    def __len__(self) -> int:
        """How many proposals' outcomes are kept."""
        with self._lock:
            return sum(1 for known in self._known.values() if not isinstance(known, _Pending))

    @staticmethod
    def key(request: bytes) -> bytes:
        """What the outcome depends on: every byte of the request but its AE titles."""
        digest = hashlib.sha256(request[:AE_TITLES.start])
        digest.update(memoryview(request)[AE_TITLES.stop:])
        return digest.digest()

    def get(self, request: bytes) -> Negotiated | None:
        """The outcome of negotiating ``request``: the one kept, else computed now (once for
        requests arriving together; should that fail, those waiting get ``None``)."""
        key = self.key(request)
        with self._lock:
            known = self._known.get(key)
            if known is None and key not in self._known:
                pending = self._known[key] = _Pending()
            elif isinstance(known, _Pending):
                pending = known
            else:
                self._known.move_to_end(key)
                return known
            computing = pending is not known
        if not computing:
            pending.done.wait()
            return pending.result
        try:
            pending.result = self._compute(request)
        except BaseException:
            with self._lock:
                self._known.pop(key, None)
            raise
        else:
            with self._lock:
                self._known[key] = pending.result
                while len(self._known) > self._kept:
                    self._known.popitem(last=False)
        finally:
            pending.done.set()
        return pending.result
