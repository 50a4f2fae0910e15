"""Viewer links: signed, expiring links that open the OHIF viewer on one study (or its key
images), the DSP confidentiality rules checked when a link is made and on every request, the
portal API and the access trail (DESIGN.md, "Links").

The composition root calls :func:`mount`; :class:`~viewer_links.service.LinkService` is the
``gateway.access.AccessPolicy`` it hands to the DICOMweb front end.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.core import Gateway
from viewer_links.service import LinkService
from viewer_links.settings import link_settings
from viewer_links.viewer import ViewerFiles


def build_service(gateway: Gateway) -> LinkService:
    """The link service of a gateway, from its ``[links]`` settings."""
    settings, keys = link_settings(gateway.settings)
    return LinkService(gateway, settings, keys)


def mount_api(app: web.Application, service: LinkService, errors: Middleware) -> None:
    """Add ``/api``, ``/view/{token}`` and ``/iid`` to the root application; ``errors`` is
    the middleware that answers their errors (the composition root gives DICOMweb's)."""
    from viewer_links.web import API_MOUNT, add_landing_routes, create_api_app

    app.add_subapp(API_MOUNT, create_api_app(service, errors))
    add_landing_routes(app, service, ViewerFiles(service.settings.viewer_dir), errors)


def mount_viewer(app: web.Application, service: LinkService) -> None:
    """Serve OHIF at ``/``. Call last: it answers every path no other route took."""
    from viewer_links.web import add_viewer_routes

    add_viewer_routes(app, ViewerFiles(service.settings.viewer_dir))


__all__ = ["LinkService", "build_service", "mount_api", "mount_viewer"]
