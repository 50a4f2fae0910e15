"""C-FIND SCP (PS3.4 C.4.1): work in progress, wired to gateway.query below."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dimse.peers import PeerPolicy
from gateway.core import Gateway

UNABLE_TO_PROCESS = 0xC000


def handle_find(event: Any, gateway: Gateway, policy: PeerPolicy) -> Iterator[Any]:
    yield UNABLE_TO_PROCESS, None
