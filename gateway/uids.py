"""UID validation (PS3.5 §9.1).

UIDs arrive from the network (C-STORE data sets, URL paths, query parameters). They are checked
here before they touch a file path or a query.
"""

from __future__ import annotations

import re

from gateway.errors import InvalidUID

MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Many deployed systems emit components with leading zeros; PS3.5 forbids them but archives
# accept them. Only the character set and length matter for safety.
_LENIENT_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    """Tell whether ``value`` is a UID safe to use in paths and queries.

    >>> is_valid_uid("1.2.840.10008.1.2.1")
    True
    >>> is_valid_uid("../../etc/passwd")
    False
    >>> is_valid_uid("1" * 65)
    False
    """
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _LENIENT_UID_RE.fullmatch(value) is not None
    )


def is_strict_uid(value: str) -> bool:
    """Tell whether ``value`` also follows the no-leading-zero rule of PS3.5 §9.1.

    >>> is_strict_uid("1.2.03")
    False
    """
    return is_valid_uid(value) and _UID_RE.fullmatch(value) is not None


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`InvalidUID`.

    Parameters
    ----------
    value
        The candidate UID, as received.
    what
        What the UID is, for the error message (e.g. ``"StudyInstanceUID"``).

    Raises
    ------
    InvalidUID
        If ``value`` is not digits separated by single dots, or is longer than 64 characters.

    >>> validate_uid("1.2.3")
    '1.2.3'
    >>> validate_uid("1.2.x", "StudyInstanceUID")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gateway.errors.InvalidUID: StudyInstanceUID '1.2.x' is not a valid DICOM UID ...
    """
    if not is_valid_uid(value):
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80])
        raise InvalidUID(
            f"{what} {shown} is not a valid DICOM UID (digits and dots, at most 64 characters)"
        )
    return value  # type: ignore[return-value]
