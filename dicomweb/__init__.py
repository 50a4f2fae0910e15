"""DICOMweb origin server (PS3.18): QIDO-RS, WADO-RS, STOW-RS, delete and capabilities, the
FHIR R4 read side, and the server's health and metrics routes.

Mounted by the composition root (:mod:`gateway.server`) at ``/dicomweb``; see
:func:`dicomweb.app.create_app` (the application), :mod:`dicomweb.context` (what handlers read
from a request) and :mod:`dicomweb.problems` (errors as responses).
"""
