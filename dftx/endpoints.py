"""
Client endpoints and TLS, for every layer that connects out (the Redis
client, the OVSDB monitor).

An address is C{host:port} (C{[v6]:port} for an IPv6 host) or
C{unix:/path}.  A configured host is either a bare C{host:port} (TCP, or
TLS when L{TLSOptions} are given) or a Twisted client endpoint string of
scheme C{tcp}, C{tcp6}, C{ssl}, C{tls} or C{unix}: C{tcp:host=h:port=p},
C{ssl:host=h:port=p:caCertsDir=/etc/ca:hostname=server.example}
(certificate checked against C{hostname} through service-identity; without
C{hostname}, against the host connected to, where Twisted's own parser
would check no name at all), C{unix:/run/server.sock}.

L{describe} parses a configured host into a L{Description};
L{endpoint_at} reaches any address the way a description says (same scheme
and options, only host and port replaced), which is how the Redis client
reaches the nodes a cluster announces (L{dftx.redis.endpoints});
L{client_endpoint} is the endpoint of one configured host.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = [
    "Description", "TLSOptions", "client_endpoint", "describe", "endpoint_at",
    "format_address", "split_address", "tls_from_config",
]

_SCHEMES = ("tcp", "tcp6", "ssl", "tls", "unix")


def format_address(host: str, port: int) -> str:
    """C{"host:port"}, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    """
    The host and port of C{"host:port"} or C{"[v6]:port"}.

    @raise ValueError: when there is no valid port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass(frozen=True)
class TLSOptions:
    """
    TLS for bare C{host:port} hosts (the [df_redis] tls settings).  The
    files are read once, when the first connection's options are built.

    @ivar ca_file: PEM file of the CA(s) that sign the servers'
        certificates; every certificate in it is trusted.
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
        """The TLS options for connecting to C{host}.

        @raise OSError: when a file cannot be read.
        @raise ValueError: when C{ca_file} holds no certificate."""
        trust, client_cert = self._loaded
        return ssl.optionsForClientTLS(
            self.hostname or host, trustRoot=trust, clientCertificate=client_cert
        )

    @functools.cached_property
    def _loaded(self) -> tuple[Any, ssl.PrivateCertificate | None]:
        """The trust root and client certificate, read from the files."""
        with open(self.ca_file, "rb") as f:
            cas = x509.load_pem_x509_certificates(f.read())
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(ca.public_bytes(Encoding.PEM)) for ca in cas]
        )
        client_cert = None
        if self.cert_file:
            with open(self.cert_file, "rb") as f:
                pem = f.read()
            if self.key_file:
                with open(self.key_file, "rb") as f:
                    pem += b"\n" + f.read()
            client_cert = ssl.PrivateCertificate.loadPEM(pem)
        return trust, client_cert


def tls_from_config(section: Any) -> TLSOptions | None:
    """The L{TLSOptions} of a [df_redis]-style config section (C{tls},
    C{ca_file}, C{cert_file}, C{key_file}); None when C{tls} is off."""
    if not section.tls:
        return None
    return TLSOptions(section.ca_file, section.cert_file or None, section.key_file or None)


@dataclass(frozen=True)
class Description:
    """
    A configured host, parsed.

    @ivar scheme: the endpoint string's scheme; C{""} for a bare
        C{host:port}.
    @ivar address: C{"host:port"}, or C{"unix:/path"}.
    @ivar options: the endpoint string's raw C{key=value} tokens other than
        host, port and path.
    """

    scheme: str
    address: str
    options: tuple[str, ...]

    def at(self, address: str, timeout: float) -> str:
        """The endpoint string that reaches C{address} like this one: its
        scheme and options, with C{address}'s host and port (and, for
        C{ssl:} without C{hostname}, the certificate checked against that
        host)."""
        host, port = split_address(address)
        options = list(self.options)
        if self.scheme == "ssl" and not any(o.startswith("hostname=") for o in options):
            options.append(f"hostname={_escape(host)}")
        if not any(o.startswith("timeout=") for o in options):
            options.append(f"timeout={int(max(1, timeout))}")
        return ":".join([self.scheme, f"host={_escape(host)}", f"port={port}", *options])


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


def describe(host: str) -> Description:
    """
    Parse one configured host (see the module docstring).

    @raise ValueError: naming the host, when it is neither form.
    """
    scheme = host.split(":", 1)[0]
    if scheme not in _SCHEMES:
        h, port = split_address(host)
        return Description("", format_address(h, port), ())
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
        return Description(scheme, f"unix:{path}", tuple(options))
    h = named.get("host") or (positional[0] if positional else "")
    port = named.get("port") or (positional[1] if len(positional) > 1 else "")
    if not h or not port.isdigit():
        raise ValueError(f"no host and port in {host!r}")
    return Description(scheme, format_address(h, int(port)), tuple(options))


def endpoint_at(
    reactor: Any,
    description: Description,
    address: str,
    tls: TLSOptions | None = None,
    timeout: float = 5.0,
) -> IStreamClientEndpoint:
    """
    A client endpoint for C{address}, reached the way C{description} says:
    a bare C{host:port} description by TCP (wrapped in C{tls} when given),
    an endpoint string with its scheme and options (L{Description.at}); a
    C{unix:} address by its socket.
    """
    if address.startswith("unix:"):
        return endpoints.UNIXClientEndpoint(reactor, address[5:], timeout=timeout)
    host, port = split_address(address)
    if description.scheme in ("", "unix"):
        plain = _tcp(reactor, host, port, timeout)
        if tls is None:
            return plain
        return endpoints.wrapClientTLS(tls.client_options(host), plain)
    return endpoints.clientFromString(reactor, description.at(address, timeout))


def client_endpoint(
    reactor: Any, host: str, tls: TLSOptions | None = None, timeout: float = 5.0
) -> IStreamClientEndpoint:
    """
    The client endpoint of one configured host (see the module docstring).

    @raise ValueError: when C{host} names no address.
    """
    d = describe(host)
    return endpoint_at(reactor, d, d.address, tls, timeout)


def _tcp(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    cls = endpoints.TCP6ClientEndpoint if ip.version == 6 else endpoints.TCP4ClientEndpoint
    return cls(reactor, host, port, timeout=timeout)
