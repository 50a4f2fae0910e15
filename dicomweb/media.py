"""Media types: ``Accept`` negotiation (PS3.18 §8.7) and multipart/related framing (RFC 2387).

Only names and small pure helpers live here; the routes decide what they can produce.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from aiohttp import web

from gateway.http_status import HTTPProblem

MEDIA_DICOM = "application/dicom"
MEDIA_DICOM_JSON = "application/dicom+json"
MEDIA_DICOM_XML = "application/dicom+xml"
MEDIA_JSON = "application/json"
MEDIA_OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"

# Transfer syntaxes (PS3.5 Annex A).
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
ANY_TRANSFER_SYNTAX = "*"


@dataclass(frozen=True)
class MediaRange:
    """One element of an ``Accept`` header, e.g. ``multipart/related; type="application/dicom"``.

    >>> r = parse_accept('multipart/related; type="application/dicom"; transfer-syntax=*')[0]
    >>> r.media_type, r.params["type"], r.params["transfer-syntax"]
    ('multipart/related', 'application/dicom', '*')
    """

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range covers ``media_type`` (``*/*``, ``type/*`` or exact)."""
        if self.media_type == "*/*":
            return True
        main, _, sub = self.media_type.partition("/")
        other_main, _, _other_sub = media_type.partition("/")
        if sub == "*":
            return main == other_main
        return self.media_type == media_type


def _split_params(text: str) -> list[str]:
    """Split on ``;`` and ``,`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char in ";," and not quoted:
            parts.append("".join(current))
            parts.append(char)
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """Parse an ``Accept`` header into media ranges, best (highest q) first.

    An absent or empty header is ``*/*``.

    >>> [r.media_type for r in parse_accept("application/json;q=0.5, application/dicom+json")]
    ['application/dicom+json', 'application/json']
    """
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[MediaRange] = []
    tokens = _split_params(header)
    current: list[str] = []
    groups: list[list[str]] = []
    for token in tokens:
        if token == ",":
            groups.append(current)
            current = []
        elif token != ";":
            current.append(token)
    groups.append(current)
    for group in groups:
        if not group or not group[0].strip():
            continue
        media_type = group[0].strip().lower()
        params: dict[str, str] = {}
        q = 1.0
        for item in group[1:]:
            name, _, value = item.partition("=")
            name = name.strip().lower()
            value = value.strip().strip('"')
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            elif name:
                # A media type named in a parameter is case-insensitive (RFC 9110 §8.3.1).
                params[name] = value.lower() if name == "type" else value
        if q > 0:
            ranges.append(MediaRange(media_type, params, q))
    ranges.sort(key=lambda r: -r.q)
    return ranges


def accept_of(request: web.Request) -> list[MediaRange]:
    """The request's acceptable media: the ``accept`` query parameter wins (PS3.18 §8.3.3.1)."""
    return parse_accept(request.query.get("accept") or request.headers.get("Accept"))


def not_acceptable(what: str) -> HTTPProblem:
    return HTTPProblem(406, f"cannot produce any of the requested media types; {what}")


def new_boundary() -> str:
    return f"dicomweb-{secrets.token_hex(16)}"


def multipart_content_type(boundary: str, part_type: str,
                           transfer_syntax: str | None = None) -> str:
    """The ``Content-Type`` of a multipart/related response (RFC 2387, PS3.18 §8.7.3)."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def part_header(boundary: str, content_type: str, location: str | None = None) -> bytes:
    """The delimiter and headers that open one part."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def closing_delimiter(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()
