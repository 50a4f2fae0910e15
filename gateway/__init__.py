"""DICOM imaging gateway: the transport-free core.

The front ends (``dimse``, ``dicomweb``, ``viewer_links``) import this package; it imports none
of them except in its composition root (``gateway.server`` and ``gateway.cli``).
"""

__version__ = "0.1.0"
