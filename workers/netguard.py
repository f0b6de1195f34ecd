"""Where an item fetch may connect: the address policy for image URLs read from INPUT.

A manifest's or a Parquet file's image references are data written by others, not trusted
URLs: a worker must not become a way into its own network. By default an item URL may reach
public addresses only; an address is refused when it is unspecified (``0.0.0.0``, ``::``),
loopback, link-local (``169.254.169.254``, the cloud metadata service), multicast, private
(RFC 1918, carrier-grade NAT ``100.64.0.0/10``, unique-local ``fc00::/7``) or reserved (every
other special-purpose block: documentation, benchmarking, ``240.0.0.0/4``, broadcast,
Teredo...). IPv4 carried in IPv6 (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
``2002::/16``) is judged as the IPv4 address it carries.

The check runs at connect time, in the httpcore network backend of the item client
(``guarded_client``): a host name is resolved once, EVERY address it resolves to must pass,
and the socket connects to one of those checked addresses (never a second resolution), so
neither DNS rebinding nor a redirect hop (each hop opens its own connection) gets past it.

``MOONBATCH_ALLOW_PRIVATE_HOSTS`` (``parse_rules``) opens the door for a trusted setup: a
comma-separated list of networks (``10.0.0.0/8``, ``fd00::/8``), addresses (``127.0.0.1``,
``::1``) or host names (``images.internal``), each optionally with a port (``127.0.0.1:8080``,
``[::1]:8080``, ``images.internal:8443``). A host-name entry trusts whatever that name
resolves to.

Proxies: item fetches ignore ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and ``.netrc`` (a
proxy resolves names itself, so the worker could not see where a request goes; and no
credential is ever sent to a host a manifest names).

Deadline: ``DEADLINE`` (a context variable, ``time.monotonic()`` seconds) clamps every
connect, TLS handshake, read and write of the item being fetched to the time left, so a
server that sends a byte a second cannot hold a fetch past it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import ipaddress
import re
import socket
import time
from typing import Any

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SETTING = "MOONBATCH_ALLOW_PRIVATE_HOSTS"
MAX_REDIRECTS = 5  # hops an item URL may take; each hop's connection is checked

#: ``time.monotonic()`` by which the current item's fetch must be done (None: no deadline).
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("item_deadline",
                                                                       default=None)

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated, still routed privately
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the low 32 bits are IPv4
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215, local use
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                     "192.168.0.0/16"))
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


class Refused(Exception):
    """An item reference the policy refuses (a non-public address, a local file, a bucket
    outside the allow-list); the message names the rule and the setting that opens it, and
    holds no query string."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64 well-known prefix, 6to4), or
    None."""
    if ip.version == 4:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_class(ip: IPAddress) -> str | None:
    """None for a public address, else why it is not: ``"unspecified"``, ``"loopback"``,
    ``"link-local"``, ``"multicast"``, ``"private"`` or ``"reserved"`` (an address carrying
    IPv4 gets ``"<class> (IPv4 a.b.c.d inside IPv6)"``)."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        kind = address_class(inner)
        return None if kind is None else f"{kind} (IPv4 {inner} inside IPv6)"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4:
        if ip in _SHARED or any(ip in n for n in _RFC1918):
            return "private"
    elif ip in _UNIQUE_LOCAL or ip in _SITE_LOCAL:
        return "private"
    if ip.is_private or ip.is_reserved or not ip.is_global or \
            (ip.version == 6 and ip in _NAT64_LOCAL):
        return "reserved"
    return None


@dataclasses.dataclass(frozen=True)
class AllowRule:
    """One entry of ``MOONBATCH_ALLOW_PRIVATE_HOSTS``: a ``network`` or a host ``name``
    (lower case, no trailing dot), and a ``port`` (None: any)."""

    network: IPNetwork | None = None
    name: str | None = None
    port: int | None = None

    def allows_name(self, host: str, port: int) -> bool:
        """True when this is a host-name entry for ``host`` (and ``port``)."""
        return self.name is not None and self.name == _norm_host(host) and \
            self.port in (None, port)

    def allows_address(self, ip: IPAddress, port: int) -> bool:
        """True when ``ip`` (or the IPv4 it carries) is in this entry's network (and
        ``port``)."""
        if self.network is None or self.port not in (None, port):
            return False
        inner = embedded_ipv4(ip)
        return ip in self.network or (inner is not None and inner in self.network)


def parse_rules(text: str | None) -> tuple[AllowRule, ...]:
    """The rules of a ``MOONBATCH_ALLOW_PRIVATE_HOSTS`` value (see the module docstring);
    empty for an empty value. Raises ``ValueError`` naming the entry and the forms allowed."""
    rules = []
    for entry in re.split(r"[,\s]+", (text or "").strip()):
        if entry:
            rules.append(_parse_rule(entry))
    return tuple(rules)


def _parse_rule(entry: str) -> AllowRule:
    forms = ("use a network (10.0.0.0/8), an address (127.0.0.1, ::1) or a host name, each "
             "optionally with :port (127.0.0.1:8080, [::1]:8080)")
    host, port = entry, None
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{SETTING}: {entry!r} is not an entry: {forms}")
        port = rest[1:] or None
        if not rest[1:] and rest:
            raise ValueError(f"{SETTING}: {entry!r} has an empty port: {forms}")
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    number = None
    if port is not None:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{SETTING}: {entry!r}: the port must be 1..65535: {forms}")
        number = int(port)
    try:
        return AllowRule(network=ipaddress.ip_network(host, strict=False), port=number)
    except ValueError:
        pass
    name = _norm_host(host)
    if not name or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{SETTING}: {entry!r} is not a network, an address or a host name: "
                         f"{forms}")
    return AllowRule(name=name, port=number)


def _norm_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def check_addresses(host: str, port: int, addresses: list[IPAddress],
                    rules: tuple[AllowRule, ...]) -> None:
    """Raise ``Refused`` unless every address of ``host`` is public or allowed by ``rules``
    (a host-name rule for ``host`` allows them all)."""
    if any(rule.allows_name(host, port) for rule in rules):
        return
    for ip in addresses:
        kind = address_class(ip)
        if kind is None or any(rule.allows_address(ip, port) for rule in rules):
            continue
        shown = embedded_ipv4(ip) or ip  # an allow entry for the IPv4 form covers both
        entry = f"[{shown}]:{port}" if shown.version == 6 else f"{shown}:{port}"
        article = "an" if kind[0] in "aeiou" else "a"
        what = f"{host} is {article} {kind} address" if _is_literal(host, ip) else \
            f"{host} resolves to {ip}, {article} {kind} address"
        raise Refused(f"refused to connect to {_hostport(host, port)}: {what}; item URLs may "
                      f"reach only public addresses: to allow it, add {entry} to {SETTING} on "
                      "the workers")


def _is_literal(host: str, ip: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == ip
    except ValueError:
        return False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _clamp(timeout: float | None, exc: type[Exception]) -> float | None:
    """``timeout`` cut to the time left before ``DEADLINE``; raises ``exc`` once it passed."""
    deadline = DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise exc("the item's deadline passed")
    return left if timeout is None else min(timeout, left)


class GuardedStream(httpcore.NetworkStream):
    """A network stream whose every operation's timeout is clamped to ``DEADLINE``."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return GuardedStream(self._inner.start_tls(ssl_context, server_hostname,
                                                   _clamp(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend behind the address policy: ``connect_tcp`` resolves the host
    once, checks every address (``check_addresses``; raises ``Refused``) and connects to a
    checked one; Unix sockets are refused. Streams are ``GuardedStream``."""

    def __init__(self, rules: tuple[AllowRule, ...] = ()) -> None:
        self.rules = rules
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None
                    ) -> httpcore.NetworkStream:
        _clamp(timeout, httpcore.ConnectTimeout)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a label IDNA cannot encode
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        addresses: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if ip not in addresses:
                addresses.append(ip)
        check_addresses(host, port, addresses, self.rules)
        last: Exception = httpcore.ConnectError(f"{host} resolves to no address")
        for ip in addresses:
            try:
                return GuardedStream(self._inner.connect_tcp(
                    str(ip), port, _clamp(timeout, httpcore.ConnectTimeout), local_address,
                    socket_options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        raise Refused("item URLs may not reach Unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport over a ``GuardedBackend`` connection pool. httpx takes no network
    backend, so the pool it builds is replaced by one that uses ours (same settings)."""

    def __init__(self, rules: tuple[AllowRule, ...], limits: httpx.Limits) -> None:
        super().__init__(trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=GuardedBackend(rules))


def guarded_client(rules: tuple[AllowRule, ...], *, timeout: float,
                   connections: int = 64) -> httpx.Client:
    """An ``httpx.Client`` for item URLs: the address policy on every connection (redirect
    hops too, at most ``MAX_REDIRECTS``), no proxies or ``.netrc`` from the environment,
    ``timeout`` seconds per connect/read/write, and ``Accept-Encoding: identity`` (an image is
    read as it is stored; a body is never inflated past the size cap)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.Client(transport=GuardedTransport(rules, limits), timeout=timeout,
                        follow_redirects=True, max_redirects=MAX_REDIRECTS, trust_env=False,
                        headers={"User-Agent": "moonbatch", "Accept-Encoding": "identity"})
