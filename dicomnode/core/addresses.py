"""Sets of IP addresses and networks from the settings (trusted balancers and proxies)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """The address in `text` (an IPv4-mapped IPv6 address as IPv4, a zone id dropped), or
    None when it is not one."""
    try:
        ip = ipaddress.ip_address(text.strip().split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AddressSet:
    """IP addresses and networks, e.g. ("10.0.0.5", "10.1.0.0/24", "::1")."""

    def __init__(self, items: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(item, strict=False) for item in items)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        ip = parse_ip(str(address))
        return ip is not None and any(ip in network for network in self.networks)
