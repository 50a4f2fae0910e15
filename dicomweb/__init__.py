"""DICOMweb origin server (PS3.18): QIDO-RS, WADO-RS, STOW-RS, delete and capabilities.

Mounted by the composition root (:mod:`gateway.server`) at ``/dicomweb``; see
:func:`dicomweb.app.create_app`.
"""

from dicomweb.app import GATEWAY, POLICY, PRINCIPAL, create_app

__all__ = ["GATEWAY", "POLICY", "PRINCIPAL", "create_app"]
