"""The gateway's own association loop: associations over plain TCP, run without pynetdicom's
DUL (see :mod:`dimse.loop.acceptor`)."""
