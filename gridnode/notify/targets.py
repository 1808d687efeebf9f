"""
Where a webhook may go: a ``notify`` URL's checks, and the address rule that keeps a job's
webhooks from reaching into the pool's own network (SSRF).

A URL is ``http`` or ``https`` with a host, no user or password, no fragment, at most
`MAX_URL` characters. Its host is resolved and every address it resolves to must be public:
loopback, private, link-local (the cloud metadata service, 169.254.169.254), shared (CGNAT),
multicast, unspecified and reserved addresses are refused, IPv4 and IPv6 alike, and an IPv4
address inside IPv6 (mapped, 6to4, NAT64, Teredo) is judged as the IPv4 address it carries.
``--webhook-allow CIDR`` lets an operator open a range on purpose (a receiver on loopback).
Every address must pass, not one: a name that resolves to a public and a private address is
refused, since the connection could go to either. The checks run at submission (a coded 400)
and again before each delivery (DNS may have changed since); the delivery connects to the
address checked then, never to a name resolved again (gridnode/notify/post.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gridnode.errors import GridnodeError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the longest notify URL taken
MAX_URL = 2048
#: notify URLs one job may name
MAX_URLS = 4
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class NotifyRefused(GridnodeError):
    """A notify URL the node will not send to (syntax, or where its host resolves)."""

    code = "notify_refused"
    status = 400


@dataclass(frozen=True)
class Target:
    """A checked notify URL, split."""

    url: str
    scheme: str
    host: str  # without brackets for an IPv6 literal
    port: int


def parse_url(url: str) -> Target:
    """The target of ``url``, or `NotifyRefused` saying what is wrong with it."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise NotifyRefused(f"a notify URL is an http(s) URL of at most {MAX_URL} characters")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7f for c in url):
        raise NotifyRefused("a notify URL holds no spaces, control or non-ASCII characters (percent-encode them)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise NotifyRefused(f"notify URL {url[:80]!r} does not parse: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise NotifyRefused(f"notify URL {url[:80]!r}: only http and https are sent to")
    if parts.username is not None or parts.password is not None:
        raise NotifyRefused(f"notify URL {url[:80]!r} holds a user or password; put a secret in the path or "
                            "query, or verify the signature instead")
    if parts.fragment:
        raise NotifyRefused(f"notify URL {url[:80]!r} has a fragment (#...), which is never sent; drop it")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise NotifyRefused(f"notify URL {url[:80]!r} names no host")
    return Target(url, scheme, host, port or (443 if scheme == "https" else 80))


def parse_urls(text: str | None) -> list[str]:
    """Notify URLs written as one comma-separated string (a query parameter, a header, tus
    metadata): each checked for syntax; at most `MAX_URLS`, duplicates dropped."""
    if text is None:
        return []
    urls: list[str] = []
    for part in text.split(","):
        url = part.strip()
        if url and url not in urls:
            parse_url(url)
            urls.append(url)
    if len(urls) > MAX_URLS:
        raise NotifyRefused(f"a job may name at most {MAX_URLS} notify URLs; it named {len(urls)}")
    return urls


@dataclass(frozen=True)
class Defaults:
    """``--webhook``: the notify URLs of a job that names none: its tenant's, where the operator
    gave the tenant some, else the pool's."""

    pool: tuple[str, ...] = ()
    #: (tenant, its URLs), sorted by tenant
    tenants: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pool or self.tenants)

    def of(self, tenant: str) -> tuple[str, ...]:
        """The URLs a job of ``tenant`` that names none is notified at."""
        return next((urls for name, urls in self.tenants if name == tenant), self.pool)


#: where a ``--webhook`` item names a tenant: ``TENANT=URLS``, the tenant without ``:``, ``/`` or ``=``
#: (so a URL, whose scheme holds ``:``, is never read as one)
_TENANT_ITEM = re.compile(r"([^:/=\s]{1,256})=(.*)", re.DOTALL)


def parse_defaults(items: Iterable[str]) -> Defaults:
    """``--webhook`` values: each holds whitespace-separated items, ``URLS`` (the pool's) or
    ``TENANT=URLS`` (that tenant's), URLS comma-separated; a tenant named twice gets both lists.
    `NotifyRefused` for a bad URL, ValueError for an item that is neither."""
    pool: list[str] = []
    tenants: dict[str, list[str]] = {}
    for item in (part for value in items for part in value.split()):
        named = _TENANT_ITEM.fullmatch(item)
        if named is None and "=" in item.split("://", 1)[0]:
            raise ValueError(f"{item[:80]!r} is neither URLS nor TENANT=URLS (a tenant holds no ':', '/' or '=')")
        target, text = (tenants.setdefault(named[1], []), named[2]) if named else (pool, item)
        urls = parse_urls(text)
        if not urls:
            raise ValueError(f"{item[:80]!r} names no URL")
        target += [u for u in urls if u not in target]
        if len(target) > MAX_URLS:
            raise NotifyRefused(f"at most {MAX_URLS} notify URLs per tenant, and for the pool")
    return Defaults(tuple(pool), tuple(sorted((t, tuple(u)) for t, u in tenants.items())))


def parse_allow(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``--webhook-allow`` CIDRs (ValueError on a bad one)."""
    nets: list[IPNetwork] = []
    for value in values:
        try:
            nets.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not a CIDR such as 127.0.0.0/8 or fd00::/8") from None
    return tuple(nets)


def embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, Teredo client), else None."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class AddressRule:
    """Which addresses a webhook may be sent to: public ones, and those ``allow`` names."""

    def __init__(self, allow: Iterable[IPNetwork] = ()) -> None:
        self.allow = tuple(allow)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why ``ip`` is refused, or None when a webhook may go there."""
        if any(ip.version == net.version and ip in net for net in self.allow):
            return None
        inner = embedded_v4(ip)
        if inner is not None:
            if self.refusal(inner) is None:
                return None
            return f"{ip} carries {inner}, which is not a public address"
        if ip.is_multicast:
            return f"{ip} is a multicast address"
        if not ip.is_global:
            return f"{ip} is not a public address (loopback, private, link-local, metadata or reserved)"
        return None

    def check(self, target: Target, addresses: list[IPAddress]) -> IPAddress:
        """The address to connect to for ``target``: the first of ``addresses``, once every one
        passed; else `NotifyRefused`."""
        if not addresses:
            raise NotifyRefused(f"notify URL host {target.host!r} resolves to no address")
        for ip in addresses:
            why = self.refusal(ip)
            if why is not None:
                raise NotifyRefused(f"notify URL host {target.host!r}: {why}; the node sends webhooks to public "
                                    "addresses only, unless its operator allows a range (--webhook-allow CIDR)")
        return addresses[0]


def literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


#: how a host name becomes addresses: (host, port) -> a Deferred list of addresses
Resolve = Callable[[str, int], Any]


def system_resolver(reactor: Any) -> Resolve:
    """getaddrinfo(3) on the reactor's thread pool (the reactor never blocks on DNS)."""
    import socket

    from twisted.internet.threads import deferToThreadPool

    def lookup(host: str, port: int) -> list[IPAddress]:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise NotifyRefused(f"notify URL host {host!r} does not resolve ({e})") from None
        out: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in found:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if ip not in out:
                out.append(ip)
        return out

    def resolve(host: str, port: int) -> Any:
        ip = literal(host)
        if ip is not None:
            from twisted.internet.defer import succeed

            return succeed([ip])
        return deferToThreadPool(reactor, reactor.getThreadPool(), lookup, host, port)

    return resolve
