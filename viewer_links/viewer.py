"""OHIF, the zero-install web viewer: installing its prebuilt bundle and serving it at ``/``.

``dicom-gateway viewer install`` fetches a pinned ``@ohif/app`` release with ``npm pack`` (the
registry's tarball, checked by npm against its integrity hash) and unpacks its prebuilt
``dist/`` into the viewer folder. The bundle's webpack public path is ``/``, so it is served at
the root of the HTTP server; the gateway's own routes keep their prefixes and win.

The ``app-config.js`` it loads is generated: one DICOMweb data source on the same-origin
``/dicomweb``, the study list hidden, and flags matching what the server supports.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from aiohttp import web

logger = logging.getLogger(__name__)

PACKAGE = "@ohif/app"
VERSION_FILE = ".ohif-version"
# Paths the viewer never answers, even with its SPA fallback: the gateway's own prefixes.
RESERVED_PREFIXES = frozenset({"dicomweb", "api", "view", "iid", "healthz", "readyz", "metrics"})
HASHED = re.compile(r"\.[0-9a-f]{16,}\.(js|css|wasm)$|^[0-9a-f]{16,}\.(wasm|woff2?)$")
# OHIF decodes with WebAssembly and SharedArrayBuffer: it needs cross-origin isolation.
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("font/woff2", ".woff2")


class ViewerInstallError(RuntimeError):
    """The viewer could not be fetched or unpacked; the message says what to do."""


def installed_version(folder: Path) -> str | None:
    """The OHIF version unpacked in ``folder``, or ``None`` if none is."""
    marker = folder / VERSION_FILE
    if not (folder / "index.html").is_file() or not marker.is_file():
        return None
    return marker.read_text().strip() or None


def install(folder: Path, version: str, *, npm: str = "npm", force: bool = False) -> bool:
    """Fetch ``@ohif/app@version`` with ``npm pack`` and unpack its ``dist/`` into ``folder``.

    The new copy is unpacked next to ``folder`` and swapped in with renames, so a running
    gateway never sees half a viewer. Returns ``False`` when that version is already there.

    Raises
    ------
    ViewerInstallError
        npm is missing or failed, or the package has no ``dist/``.
    """
    folder = folder.resolve()
    if not force and installed_version(folder) == version:
        return False
    if shutil.which(npm) is None:
        raise ViewerInstallError(
            "npm is not installed; install Node.js and npm (Debian: apt-get install npm), "
            "then run `dicom-gateway viewer install` again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ohif-", dir=folder.parent) as tmp:
        work = Path(tmp)
        spec = f"{PACKAGE}@{version}"
        try:
            done = subprocess.run(
                [npm, "pack", spec, "--pack-destination", str(work), "--json", "--silent"],
                capture_output=True, text=True, timeout=900, check=False, cwd=work,
            )
        except subprocess.TimeoutExpired:
            raise ViewerInstallError(f"npm pack {spec} took longer than 15 minutes") from None
        if done.returncode != 0:
            raise ViewerInstallError(
                f"npm pack {spec} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        try:
            filename = json.loads(done.stdout)[0]["filename"]
        except (ValueError, LookupError, TypeError):
            tarballs = list(work.glob("*.tgz"))
            if not tarballs:
                raise ViewerInstallError(f"npm pack {spec} produced no tarball") from None
            filename = tarballs[0].name
        target = work / "dist"
        _unpack_dist(work / Path(filename).name, target)
        (target / VERSION_FILE).write_text(version + "\n")
        old = work / "previous"
        if folder.exists():
            folder.rename(old)
        target.rename(folder)
    logger.info("OHIF %s installed in %s", version, folder)
    return True


def _unpack_dist(tarball: Path, target: Path) -> None:
    """Extract ``package/dist/**`` (regular files only, no path escaping ``target``)."""
    count = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            path = PurePosixPath(member.name)
            if path.parts[:2] != ("package", "dist") or len(path.parts) < 3 or not member.isfile():
                continue
            relative = PurePosixPath(*path.parts[2:])
            if relative.is_absolute() or ".." in relative.parts:
                raise ViewerInstallError(f"unsafe path in the package: {member.name}")
            out = target.joinpath(*relative.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            with source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            count += 1
    if not (target / "index.html").is_file():
        raise ViewerInstallError(f"{tarball.name} has no dist/index.html ({count} files)")


def app_config(*, fuzzy_matching: bool = True, include_field: bool = True) -> str:
    """The ``app-config.js`` OHIF loads: one same-origin DICOMweb data source.

    ``qidoSupportsIncludeField`` and ``supportsFuzzyMatching`` state what the gateway's QIDO-RS
    does (PS3.18 §8.3.4.3 includefield, §8.3.4.2 fuzzy person names); images and thumbnails
    are rendered client-side from WADO-RS frames (``wadors``); bulk data URIs are resolved
    relative to the studies root (PS3.18 §10.4.1.1.4).
    """
    source = {
        "friendlyName": "DICOM gateway",
        "name": "gateway",
        "qidoSupportsIncludeField": include_field,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": fuzzy_matching,
        "supportsWildcard": True,
        "supportsReject": False,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    }
    flags = json.dumps(source, indent=2).replace("\n", "\n  ")
    return f"""/* Generated by the DICOM gateway (viewer_links.viewer.app_config); do not edit. */
(function () {{
  var root = window.location.origin + '/dicomweb';
  var configuration = {flags};
  configuration.wadoUriRoot = root;
  configuration.qidoRoot = root;
  configuration.wadoRoot = root;
  window.config = {{
    routerBasename: '/',
    showStudyList: false,
    extensions: [],
    modes: [],
    // no onboarding tour for a patient opening one exam from the DSP
    customizationService: {{ 'ohif.tours': {{ $set: [] }} }},
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    maxNumberOfWebWorkers: 3,
    investigationalUseDialog: {{ option: 'never' }},
    maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
    defaultDataSourceName: 'dicomweb',
    dataSources: [
      {{
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'dicomweb',
        configuration: configuration,
      }},
    ],
  }};
}})();
"""


def not_installed_response() -> web.Response:
    return web.Response(
        status=503, content_type="text/plain", charset="utf-8",
        text="The OHIF viewer is not installed. Run `dicom-gateway viewer install` "
             "(it needs npm), or `make run`, which does it.\n",
        headers={"Cache-Control": "no-store"},
    )


class ViewerFiles:
    """Serves an unpacked OHIF build at ``/`` with the generated ``app-config.js``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = app_config()

    @property
    def installed(self) -> bool:
        return (self.folder / "index.html").is_file()

    def _file(self, tail: str) -> Path | None:
        relative = PurePosixPath(tail)
        if relative.is_absolute() or ".." in relative.parts or any(
            part.startswith(".") for part in relative.parts
        ):
            return None
        path = self.folder.joinpath(*relative.parts)
        return path if path.is_file() else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET/HEAD of any path no other route took (the SPA and its assets)."""
        tail = request.match_info.get("tail", "")
        first = tail.split("/", 1)[0]
        if first in RESERVED_PREFIXES:
            raise web.HTTPNotFound(text=f"/{tail}: no such resource", content_type="text/plain")
        if not self.installed:
            return not_installed_response()
        headers = dict(ISOLATION_HEADERS)
        if tail == "app-config.js":
            headers["Cache-Control"] = REVALIDATE
            return web.Response(text=self.config, content_type="text/javascript",
                                charset="utf-8", headers=headers)
        path = self._file(tail) if tail else None
        if path is None:
            if "." in PurePosixPath(tail).name:  # a missing asset, not a client-side route
                raise web.HTTPNotFound(text=f"/{tail}: no such file", content_type="text/plain")
            path = self.folder / "index.html"  # SPA fallback: /viewer, /viewer/...
        headers["Cache-Control"] = IMMUTABLE if HASHED.search(path.name) else REVALIDATE
        return web.FileResponse(path, headers=headers)


__all__ = ["ViewerFiles", "ViewerInstallError", "app_config", "install", "installed_version"]
