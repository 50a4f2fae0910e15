"""Routes of the delete service (filled in by the following commits)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register this module's routes on the DICOMweb application."""
