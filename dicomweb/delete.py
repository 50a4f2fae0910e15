"""Delete studies, series and instances (``admin`` scope only).

Not a PS3.18 transaction; the form dcm4chee-arc, Orthanc and the Microsoft DICOM service share:
``DELETE`` on the study, series or instance URL, 204 (No Content) when done. Index rows are
removed in one committed transaction (:func:`gateway.instances.remove_instances`), and the
files are deleted after the commit, so a crash leaves at worst an orphan file, never a row
without its file.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from dicomweb.context import audit, gateway_of, require
from gateway.access import Scope
from gateway.audit import Action
from gateway.instances import remove_instances, validate_path, visible_instances

logger = logging.getLogger(__name__)


async def _delete(request: web.Request, study: str, series: str | None = None,
                  instance: str | None = None) -> web.Response:
    who = require(request, Scope.ADMIN)
    validate_path(study, series, instance)
    gateway = gateway_of(request)
    refs = await asyncio.to_thread(visible_instances, gateway.index, who, study, series,
                                   instance)
    pks = [r.pk for r in refs]
    paths = await asyncio.to_thread(remove_instances, gateway.index, refs)

    # Files after the commit; a path indexed again meanwhile (a re-send) keeps its file.
    await asyncio.to_thread(gateway.storage.delete_unindexed, paths, gateway.index.has_file)
    logger.info("deleted %d instances of study %s (by %s)", len(pks), study, who.audit_name)
    await audit(request, Action.DELETE, (study,),
                detail=f"deleted {len(pks)} instances"
                + (f" of series {series}" if series else "")
                + (f", instance {instance}" if instance else ""))
    return web.Response(status=204)


async def delete_study(request: web.Request) -> web.Response:
    """``DELETE /studies/{study}``."""
    return await _delete(request, request.match_info["study"])


async def delete_series(request: web.Request) -> web.Response:
    """``DELETE /studies/{study}/series/{series}``."""
    return await _delete(request, request.match_info["study"], request.match_info["series"])


async def delete_instance(request: web.Request) -> web.Response:
    """``DELETE /studies/{study}/series/{series}/instances/{instance}``."""
    info = request.match_info
    return await _delete(request, info["study"], info["series"], info["instance"])


def add_routes(app: web.Application) -> None:
    app.router.add_delete("/studies/{study}", delete_study)
    app.router.add_delete("/studies/{study}/series/{series}", delete_series)
    app.router.add_delete("/studies/{study}/series/{series}/instances/{instance}",
                          delete_instance)
