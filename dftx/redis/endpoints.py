"""
How to reach a node: from the configured hosts, and from the C{host:port}
addresses CLUSTER SLOTS names, to Twisted client endpoints.

A configured host is either C{host:port} (TCP, or TLS when L{TLSOptions} are
given) or any Twisted client endpoint string: C{tcp:host=h:port=p},
C{ssl:host=h:port=p:caCertsDir=/etc/redis/ca:hostname=redis.example}
(certificate checked against C{hostname} through service-identity),
C{unix:path=/run/redis.sock} (a single non-cluster server).  Nodes learnt
from the cluster are reached the way the first configured host is: with the
same scheme and options, only host and port replaced; with C{ssl:} and no
C{hostname}, each node's certificate is checked against the host it is
reached at.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Sequence

from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IStreamClientEndpoint

from dftx.redis.topology import format_address, split_address

_SCHEMES = ("tcp", "tcp6", "ssl", "tls", "unix")


@dataclass(frozen=True)
class TLSOptions:
    """
    TLS for C{host:port} hosts (the [df_redis] tls settings).

    @ivar ca_file: PEM file of the CA(s) that sign the servers' certificates.
    @ivar cert_file: client certificate (PEM), with C{key_file}, for servers
        that check clients (C{tls-auth-clients yes}).
    @ivar hostname: check every node's certificate against this name
        instead of the host the node is reached at.
    """

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    hostname: str | None = None

    def client_options(self, host: str) -> ssl.IOpenSSLClientConnectionCreator:
        with open(self.ca_file, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        client_cert = None
        if self.cert_file:
            with open(self.cert_file, "rb") as f:
                pem = f.read()
            if self.key_file:
                with open(self.key_file, "rb") as f:
                    pem += b"\n" + f.read()
            client_cert = ssl.PrivateCertificate.loadPEM(pem)
        return ssl.optionsForClientTLS(
            self.hostname or host, trustRoot=trust, clientCertificate=client_cert
        )


@dataclass(frozen=True)
class _Description:
    scheme: str
    address: str  # "host:port", or "unix:/path"
    options: tuple[str, ...]  # raw "key=value" tokens other than host/port/path


def _split(description: str) -> list[str]:
    """Split an endpoint description on colons not escaped by a backslash."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unescape(token: str) -> str:
    out, escaped = [], False
    for ch in token:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _describe(host: str) -> _Description:
    """
    Parse one configured host.

    @raise ValueError: naming the host, when it is neither form.
    """
    scheme = host.split(":", 1)[0]
    if scheme not in _SCHEMES:
        h, port = split_address(host)
        return _Description("", format_address(h, port), ())
    positional, named, options = [], {}, []
    for token in _split(host)[1:]:
        key, eq, value = token.partition("=")
        if not eq:
            positional.append(_unescape(token))
        elif key in ("host", "port", "path"):
            named[key] = _unescape(value)
        else:
            options.append(token)
    if scheme == "unix":
        path = named.get("path") or (positional[0] if positional else "")
        if not path:
            raise ValueError(f"no path in {host!r}")
        return _Description(scheme, f"unix:{path}", tuple(options))
    h = named.get("host") or (positional[0] if positional else "")
    port = named.get("port") or (positional[1] if len(positional) > 1 else "")
    if not h or not port.isdigit():
        raise ValueError(f"no host and port in {host!r}")
    return _Description(scheme, format_address(h, int(port)), tuple(options))


class NodeEndpoints:
    """
    The client endpoint of any node, by address.

    @ivar seeds: the addresses of the configured hosts, in order.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        reactor,
        tls: TLSOptions | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not hosts:
            raise ValueError("no Redis host given")
        described = [_describe(h) for h in hosts]
        self.seeds = [d.address for d in described]
        self._by_address = {d.address: d for d in described}
        self._template = next((d for d in described if d.scheme != "unix"), described[0])
        self._reactor = reactor
        self._tls = tls
        self._timeout = timeout

    def endpoint(self, address: str) -> IStreamClientEndpoint:
        """A client endpoint for the node at C{address}."""
        d = self._by_address.get(address, self._template)
        if address.startswith("unix:"):
            return endpoints.UNIXClientEndpoint(
                self._reactor, address[5:], timeout=self._timeout
            )
        host, port = split_address(address)
        if d.scheme in ("", "unix"):
            plain = self._tcp(host, port)
            if self._tls is None:
                return plain
            return endpoints.wrapClientTLS(self._tls.client_options(host), plain)
        return endpoints.clientFromString(self._reactor, self.description(address))

    def description(self, address: str) -> str:
        """The endpoint string for a node reached like an endpoint-string
        host: its scheme and options, with C{address}'s host and port."""
        d = self._by_address.get(address, self._template)
        host, port = split_address(address)
        options = list(d.options)
        if d.scheme == "ssl" and not any(o.startswith("hostname=") for o in options):
            options.append(f"hostname={_escape(host)}")
        if not any(o.startswith("timeout=") for o in options):
            options.append(f"timeout={int(max(1, self._timeout))}")
        return ":".join([d.scheme, f"host={_escape(host)}", f"port={port}", *options])

    def _tcp(self, host: str, port: int) -> IStreamClientEndpoint:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return endpoints.HostnameEndpoint(
                self._reactor, host, port, timeout=self._timeout
            )
        cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
        return cls(self._reactor, host, port, timeout=self._timeout)
