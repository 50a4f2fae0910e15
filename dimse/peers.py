"""Which calling AE may do what (DESIGN.md, "DIMSE peers").

- Any calling AE may C-ECHO and C-STORE, unless a listed peer has ``store = true``: then storing
  is an allow-list of those peers.
- C-FIND / C-MOVE / C-GET are allowed to any AE connecting from loopback and to listed peers
  with that service granted (off by default) *and* their address named (``host`` / ``hosts``):
  the calling AE title is only a name the caller chooses, so a peer known by it alone may store
  (if listed for it) but never read what the archive holds from elsewhere than loopback.
- A listed peer with addresses is that peer only when it connects from one of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Literal

from gateway.config import Peer

Service = Literal["echo", "store", "find", "move", "get"]


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class PeerPolicy:
    """Answers whether a calling AE at an address may use a service."""

    def __init__(self, peers: Mapping[str, Peer]) -> None:
        self.peers = dict(peers)
        self.store_allow_list = any(p.store for p in self.peers.values())

    def peer(self, ae_title: str, address: str) -> Peer | None:
        peer = self.peers.get(ae_title.strip())
        if peer is None:
            return None
        if peer.addresses and address not in peer.addresses:
            return None
        return peer

    def allows(self, service: Service, ae_title: str, address: str) -> bool:
        peer = self.peer(ae_title, address)
        if service == "echo":
            return peer.echo if peer else True
        if service == "store":
            if self.store_allow_list:
                return bool(peer and peer.store)
            return True
        if peer is not None:
            return bool(getattr(peer, service)) and bool(peer.addresses or is_loopback(address))
        return is_loopback(address)

    def unbound_peers(self) -> list[str]:
        """The listed peers without an address: anyone may call under their AE title."""
        return sorted(ae for ae, peer in self.peers.items() if not peer.addresses)

    def allows_anything(self, ae_title: str, address: str) -> bool:
        services: tuple[Service, ...] = ("echo", "store", "find", "move", "get")
        return any(self.allows(s, ae_title, address) for s in services)
