"""Where a request comes from: the client address every per-address limit counts, and the
bucket it is counted in.

The client is the TCP peer, unless the peer is a proxy named in
``SCANGATE_TRUSTED_PROXIES``: only then do ``Forwarded: for=`` and ``X-Forwarded-For`` say
who the client is. Each proxy appends the address it saw on the right of the list, and a
client can write anything on the left, so the client is the right-most entry that is not
itself a trusted proxy. A trusted proxy writes one of the two headers; a client can add
the other. When both are present and name different clients, or the entry that counts is
not an address (``for=unknown``), the request is counted as the proxy's own: a client who
forges a header shares one budget with every other forger, and never gets one of its own.
From any other peer both headers are ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web

from gateway.settings import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(request: web.Request, trusted: Sequence[Network]) -> str:
    """The address of the client that sent the request, as text (see the module's rules);
    "" when the peer has no address (a unix socket)."""
    peer = _address(request.remote)
    if peer is None:
        return ""
    if not _is_trusted(peer, trusted):
        return str(peer)
    chains: list[list[IPAddress | None]] = []
    if request.headers.get("Forwarded") is not None:
        chains.append([_address(element.get("for")) for element in request.forwarded])
    forwarded_for = request.headers.getall("X-Forwarded-For", [])
    if forwarded_for:
        entries = (entry for line in forwarded_for for entry in line.split(","))
        chains.append([_address(entry) for entry in entries])
    named = {_client_of(chain, trusted) for chain in chains}
    if len(named) == 1 and None not in named:
        return str(named.pop())
    return str(peer)


def address_bucket(address: str | None) -> str:
    """What a per-address limit counts: an IPv4 address, or an IPv6 address's /64 (one
    subscriber's network holds a whole /64, so counting single IPv6 addresses would let
    one client rotate through billions of them)."""
    if not address:
        return ""
    parsed = _address(address)
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


def _client_of(chain: Sequence[IPAddress | None], trusted: Sequence[Network]) -> IPAddress | None:
    """The right-most entry that is not a trusted proxy; the left-most when all of them
    are; None when the list is empty or the entry that counts is not an address."""
    for entry in reversed(chain):
        if entry is None or not _is_trusted(entry, trusted):
            return entry
    return chain[0] if chain else None


def _is_trusted(address: IPAddress, trusted: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def _address(text: str | None) -> IPAddress | None:
    """An address as a peer or a proxy header writes it: ``192.0.2.7``, ``192.0.2.7:4711``,
    ``2001:db8::1``, ``[2001:db8::1]:4711``, possibly quoted; an IPv4-mapped IPv6 address
    is its IPv4 address. None for anything else (``unknown``, ``_hidden``, garbage)."""
    if text is None:
        return None
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
