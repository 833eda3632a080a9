"""
How to reach a Redis node: from the configured hosts, and from the
C{host:port} addresses the cluster names, to Twisted client endpoints.

The configured hosts take any form L{dftx.endpoints} reads (C{host:port},
C{ssl:host=h:port=p:...}, C{unix:/run/redis.sock} for a single non-cluster
server).  Nodes learnt from the cluster are reached the way the first
configured host is: with the same scheme and options, only host and port
replaced; with C{ssl:} and no C{hostname}, each node's certificate is
checked against the host it is reached at.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.interfaces import IStreamClientEndpoint

from dftx.endpoints import TLSOptions, describe, endpoint_at

__all__ = ["NodeEndpoints"]


class NodeEndpoints:
    """
    The client endpoint of any node, by address.

    @ivar seeds: the addresses of the configured hosts, in order.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        reactor: Any,
        tls: TLSOptions | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not hosts:
            raise ValueError("no Redis host given")
        described = [describe(h) for h in hosts]
        self.seeds = [d.address for d in described]
        self._by_address = {d.address: d for d in described}
        self._template = next((d for d in described if d.scheme != "unix"), described[0])
        self._reactor = reactor
        self._tls = tls
        self._timeout = timeout

    def endpoint(self, address: str) -> IStreamClientEndpoint:
        """A client endpoint for the node at C{address}."""
        d = self._by_address.get(address, self._template)
        return endpoint_at(self._reactor, d, address, self._tls, self._timeout)

    def description(self, address: str) -> str:
        """The endpoint string for a node reached like an endpoint-string
        host: its scheme and options, with C{address}'s host and port."""
        return self._by_address.get(address, self._template).at(address, self._timeout)
