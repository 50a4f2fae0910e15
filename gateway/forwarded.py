"""The client's address behind trusted reverse proxies (``[http] trusted_proxies``).

A request that comes from a proxy the settings trust carries the client's address in
``X-Forwarded-For`` (each proxy appends the address it received the request from). The client
is the rightmost address that is not itself a trusted proxy: addresses to its left were written
by the client and prove nothing. From anyone else the header is ignored, so a client cannot
choose the address the trail records or the refusal limits count.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from gateway.errors import SettingsError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR blocks (``10.0.0.0/8``, ``192.0.2.7``, ``::1``).

    >>> parse_networks(["10.0.0.0/8", "192.0.2.7"])
    (IPv4Network('10.0.0.0/8'), IPv4Network('192.0.2.7/32'))
    """
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise SettingsError(f"http.trusted_proxies: {entry!r} is not an address or a "
                                "CIDR block (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded_for: list[str], networks: tuple[Network, ...]) -> str:
    """The client's address: ``peer``, or when ``peer`` is a trusted proxy, the rightmost
    address of ``X-Forwarded-For`` (each header line in order) that is not a trusted proxy.

    >>> proxies = parse_networks(["10.0.0.0/8"])
    >>> client_address("10.0.0.5", ["203.0.113.9, 10.0.0.7"], proxies)
    '203.0.113.9'
    >>> client_address("10.0.0.5", ["1.1.1.1, 198.51.100.4"], proxies)  # spoofed left part
    '198.51.100.4'
    >>> client_address("198.51.100.4", ["1.2.3.4"], proxies)  # not from a proxy: ignored
    '198.51.100.4'
    >>> client_address("10.0.0.5", ["not-an-address"], proxies)
    '10.0.0.5'
    """
    if not networks or not _trusted(peer, networks):
        return peer
    hops = [hop.strip() for line in forwarded_for for hop in line.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed chain proves nothing
        if not _trusted(hop, networks):
            return hop
    return hops[0] if hops else peer
