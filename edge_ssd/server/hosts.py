"""Which `Host` headers the server answers: the defence against DNS rebinding.

A web page cannot read a loopback server's answers across origins, but with DNS rebinding it
can: the page's own name (evil.example) is made to resolve to 127.0.0.1, so the browser sends
the page's requests to this server under the page's origin, with `Host: evil.example:8080`.
Checking the Host header against the names the server is really reached by stops that. An IP
address in Host cannot be rebound (it is no name to resolve), so what matters is the name.

Plain functions of their arguments; no Starlette.
"""
from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import EdgeSSDError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def split_host(value: str) -> Optional[tuple]:
    """`Host` as (lower-case name without brackets or trailing dot, port or None); None if malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/@\\ \t,"):
        return None
    if value.startswith("["):  # [v6] or [v6]:port
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = value.rpartition(":")
        if not sep:
            name, port_text = value, None
        elif ":" in name:  # a bare IPv6 address (no brackets): not a valid Host
            return None
    if port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        return None
    name = name.rstrip(".")
    return (name, int(port_text) if port_text is not None else None) if name else None


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """The names this server answers to.

    * Always: loopback names and addresses, and the address it is bound to, at the port the
      connection came in on (or without a port).
    * Bound beyond loopback (0.0.0.0, ::, a LAN address): also any IP address at any port
      (clients use the machine's address, which NAT and Docker port mapping rewrite), and
      this machine's host name (`pi`, `pi.local`).
    * `allowed`: more names, as `name` (any port) or `name:port`; `*` turns the check off
      (behind a reverse proxy that checks Host itself).
    """

    bind_host: str = "127.0.0.1"
    allowed: tuple = ()

    @property
    def open(self) -> bool:
        return "*" in self.allowed

    @property
    def beyond_loopback(self) -> bool:
        host = self.bind_host.strip("[]").lower()
        if host == "localhost":
            return False
        return not (is_ip(host) and ipaddress.ip_address(host).is_loopback)

    @functools.cached_property
    def own_names(self) -> frozenset:
        names = set(LOOPBACK_NAMES)
        bound = self.bind_host.strip("[]").lower()
        if bound not in WILDCARD_BINDS:
            names.add(bound)
        if self.beyond_loopback:
            host = socket.gethostname().lower()
            names.update({host, host.split(".")[0] + ".local"})
        return frozenset(names)

    def refusal(self, host_header: Optional[str], local_port: Optional[int]) -> Optional[str]:
        """Why this Host is refused, or None when it is fine."""
        if self.open:
            return None
        if host_header is None:
            return "the request has no Host header"
        parsed = split_host(host_header)
        if parsed is None:
            return f"malformed Host header {host_header[:100]!r}"
        name, port = parsed
        for entry in self.allowed:
            allowed = split_host(entry)
            if allowed is not None and allowed[0] == name and allowed[1] in (None, port):
                return None
        if self.beyond_loopback and is_ip(name):
            return None
        if name in self.own_names and (port is None or local_port is None or port == local_port):
            return None
        return (f"Host {host_header[:100]!r} is not a name of this server (a web page may be trying to reach "
                f"it through DNS rebinding); if it is yours, start the server with --allowed-hosts {name}")


def parse_allowed(text: Optional[str]) -> tuple:
    """`--allowed-hosts a,b:8080` as a tuple of entries; each must be a valid Host or `*`."""
    entries = tuple(e.strip() for e in (text or "").split(",") if e.strip())
    return check_allowed(entries)


def check_allowed(entries: Iterable[str]) -> tuple:
    """The entries as a tuple, refused at start (not on every request) when one is malformed."""
    out = tuple(entries)
    for e in out:
        if e != "*" and split_host(e) is None:
            raise EdgeSSDError(f"allowed host {e!r} is not a host name, address or host:port")
    return out
