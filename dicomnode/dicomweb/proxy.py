"""X-Forwarded-For from trusted proxies: the client's address behind a load balancer.

A WSGI middleware: when the connection comes from one of ``[http] trusted_proxies``, the
client is the right-most address of X-Forwarded-For that is not itself a trusted proxy (each
proxy appends the address it saw; entries left of the first untrusted one could be forged by
the client). ``REMOTE_ADDR`` becomes that address, so access logs, the ledger, audit
messages and failed-authentication counts name the client; the proxy's own address is kept
in ``dicomnode.proxy_addr``. From anyone else the header is ignored. A malformed entry ends
the walk: the last trusted hop stands. TLS from the client ends at the balancer when it
terminates HTTPS; the node sees plain HTTP from the balancer (see README "Scaling out").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from dicomnode.core.addresses import AddressSet, parse_ip

MAX_HOPS = 32  # entries looked at, from the right


def client_address(peer: str, forwarded_for: str, trusted: AddressSet) -> str:
    """The client's address for a request from `peer` carrying `forwarded_for`."""
    if not forwarded_for or peer not in trusted:
        return peer
    client = peer
    for entry in reversed(forwarded_for.split(",")[-MAX_HOPS:]):
        ip = parse_ip(entry)
        if ip is None:
            return client
        client = str(ip)
        if client not in trusted:
            return client
    return client


class ForwardedFor:
    """Wraps a WSGI app so that ``REMOTE_ADDR`` is the client behind `trusted` proxies."""

    def __init__(self, app: Callable[..., Any], trusted: Iterable[str]) -> None:
        self.app = app
        self.trusted = AddressSet(trusted)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        peer = environ.get("REMOTE_ADDR", "")
        forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded and self.trusted:
            environ["dicomnode.proxy_addr"] = peer
            environ["REMOTE_ADDR"] = client_address(peer, forwarded, self.trusted)
        return self.app(environ, start_response)


def install_forwarded_for(app: Any, trusted: Iterable[str]) -> None:
    """Make `app` (a Flask app) honour X-Forwarded-For from `trusted` (nothing if empty)."""
    trusted = tuple(trusted)
    if trusted:
        app.wsgi_app = ForwardedFor(app.wsgi_app, trusted)
