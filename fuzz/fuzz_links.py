"""Fuzz the viewer-link token verification (viewer_links/keys.py): what ``/view/<token>``
and the portal API are handed.

A key ring of the three kinds the gateway accepts (HS256, EdDSA, ES256) verifies the input as
a token (:meth:`KeyRing.verify`), reads its ``kid`` as the link service does after a
successful verification, and attributes a refusal (:func:`signed_claims`). Documented
refusal: :class:`~viewer_links.keys.LinkError` and its subclasses (a 4xx page naming the
reason). Anything else is a finding.

Seeds: real tokens signed by the ring (valid, expired, not yet valid, another audience,
claims missing), by keys it does not hold, and with altered headers.

Run: ``.venv/bin/python fuzz/fuzz_links.py -max_total_time=60``
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main  # noqa: E402

with atheris.instrument_imports(include=["viewer_links.keys", "jwt"]):
    import jwt

    from viewer_links.keys import Key, KeyRing, LinkError, Secret, signed_claims

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

NAME = "links"
REFUSALS = (LinkError,)
# Fixed keys: the seeds signed in one run verify in the next.
_ED25519 = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_P256 = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
RING = KeyRing([Key("local-0001", "HS256", secret=Secret(b"fuzz-secret-" * 4)),
                Key("portal-ed", "EdDSA", public_key=_ED25519.public_key()),
                Key("portal-es", "ES256", public_key=_P256.public_key())])
NOW = 1_800_000_000


def _claims(**changes: Any) -> dict[str, Any]:
    claims = {"sub": "dr-weber", "aud": "dicom-gateway", "iss": "dsp-portal", "jti": "j-1",
              "nbf": NOW - 60, "exp": 2**40, "study": "1.2.826.0.1.3680043.8.498.77.1",
              "rel": "treating", "scope": "study", "max_uses": 3}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def seeds() -> list[bytes]:
    tokens = [
        RING.sign(_claims()),
        RING.sign(_claims(exp=NOW - 3600)),
        RING.sign(_claims(nbf=2**39)),
        RING.sign(_claims(aud="another")),
        RING.sign(_claims(jti=None, sub=None)),
        RING.sign(_claims(scope="keyimages", keyimages=["1.2.3.4"])),
        jwt.encode(_claims(), _ED25519, algorithm="EdDSA", headers={"kid": "portal-ed"}),
        jwt.encode(_claims(), _P256, algorithm="ES256", headers={"kid": "portal-es"}),
        jwt.encode(_claims(), b"not our secret" * 3, algorithm="HS256",
                   headers={"kid": "local-0001"}),
        jwt.encode(_claims(), b"x" * 32, algorithm="HS256", headers={"kid": "unknown"}),
        jwt.encode(_claims(), b"x" * 32, algorithm="HS384", headers={"kid": "local-0001"}),
    ]
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": "local-0001"}).encode())
    tokens.append(header.rstrip(b"=").decode() + "." + tokens[0].split(".")[1] + ".")
    return [t.encode() for t in tokens]


def check(data: bytes) -> None:
    token = data.decode("latin-1")
    signed_claims(RING, token)
    try:
        claims = RING.verify(token)
    except REFUSALS:
        return
    if not isinstance(claims, dict):
        raise TypeError(f"claims are a {type(claims).__name__}")
    str(jwt.get_unverified_header(token)["kid"])


if __name__ == "__main__":
    main(NAME, seeds, check)
