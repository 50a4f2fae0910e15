"""DIMSE front end: the gateway's DICOM Application Entity (C-ECHO, C-STORE, C-FIND, C-MOVE,
C-GET SCP) serving the core.

An association runs one of two ways, and both answer through the same services:

- :mod:`dimse.scp` — the AE and its server: each new connection goes to one way or the other;
- :mod:`dimse.loop` — the gateway's own association loop (plain TCP): PDUs and command sets
  read and written here, in the connection's thread; C-MOVE's association to the destination
  (:mod:`dimse.loop.storage_scu`);
- :mod:`dimse.toolkit` — associations pynetdicom runs (TLS, user identity, SOP class extended
  negotiation): its event handlers and the workarounds for its timing;
- :mod:`dimse.services` — one decision per service, shared by both ways: C-STORE
  (``store_instance``), C-FIND (``find_responses``), C-MOVE and C-GET (``decide_move``,
  ``decide_get``), the access trail;
- :mod:`dimse.status` (every status answered), :mod:`dimse.peers` (who may do what),
  :mod:`dimse.tls`, :mod:`dimse.transport` (socket tuning), used by all of them.
"""
