"""
The status and metrics HTTP resource both services serve on C{http_endpoint}:

- C{GET /healthz}: C{200 ok} once the service is ready (subscribed, initial
  load done), C{503} with the reason before.
- C{GET /metrics}: the Prometheus exposition of the service's
  C{prometheus_client} registry (text 0.0.4, or OpenMetrics when the
  scraper's C{Accept} asks for it).
- C{GET /v1/status}: JSON; what the service says about itself (role,
  version, publisher id, cluster topology, subscriptions, counters).

A service provides an L{IStatusSource}; L{StatusRoot} renders it, and more
resources hang under C{/v1} with C{root.v1.putChild(b"tables", resource)}.
Each service has a registry of its own (L{registry_for}), never
C{prometheus_client}'s global one, so services sharing a process (tests, an
embedding application) do not mix their metrics.  Its current values are
collected at each scrape (L{IStatusSource.metrics}); its histograms are
C{prometheus_client.Histogram}s on the same registry.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server
from zope.interface import Attribute, Interface

__all__ = [
    "IStatusSource", "JsonLeaf", "LATENCY_BUCKETS", "StatusRoot", "Tables", "counter", "gauge",
    "json_body", "listen", "registry_for",
]

JSON = b"application/json"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
"""Histogram buckets (seconds) of the services' latencies: from a loopback
round trip to a resync of a large table during a failover."""


class IStatusSource(Interface):
    """What a service tells the HTTP resource."""

    registry = Attribute("Its prometheus_client CollectorRegistry (GET /metrics).")

    def ready():
        """@return: None when ready, otherwise text saying what is missing."""

    def degraded():
        """@return: None when healthy, otherwise text saying what fails
        while the service keeps serving (e.g. the NB DB is unreachable)."""

    def status():
        """@return: a JSON-ready dict (GET /v1/status)."""

    def metrics():
        """@return: an iterable of prometheus_client metric families, the
        service's current values (collected at each scrape)."""


def _family(kind: type, name: str, help: str, value: float | None,
            by: tuple[str, Mapping[str, float]] | None) -> Metric:
    if by is None:
        return kind(name, help, value=0 if value is None else value)
    label, values = by
    family = kind(name, help, labels=[label])
    for label_value, v in values.items():
        family.add_metric([label_value], v)
    return family


def counter(name: str, help: str, value: float | None = None,
            by: tuple[str, Mapping[str, float]] | None = None) -> Metric:
    """
    A counter family: C{value}, or one sample per item of C{by}, a label
    name and a mapping label value -> value.  C{name} ends in C{_total}.
    """
    return _family(CounterMetricFamily, name, help, value, by)


def gauge(name: str, help: str, value: float | None = None,
          by: tuple[str, Mapping[str, float]] | None = None) -> Metric:
    """A gauge family, as L{counter}."""
    return _family(GaugeMetricFamily, name, help, value, by)


class _Current(Collector):
    """Collects what C{source.metrics()} says at each scrape."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.metrics()

    def describe(self) -> Iterable[Metric]:
        return ()  # values change at run time: nothing to check at register


def registry_for(source: Any) -> CollectorRegistry:
    """
    A new registry for the service C{source}: its L{IStatusSource.metrics},
    and the process (C{process_*}: CPU, memory, open files), Python
    (C{python_info}) and garbage collector (C{python_gc_*}) metrics a
    default C{prometheus_client} registry has.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Current(source))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def json_body(request: server.Request, data: Any, code: int = 200) -> bytes:
    """Set the status and content type; @return: C{data} as JSON bytes."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON)
    return json.dumps(data, sort_keys=True, default=str).encode("utf-8") + b"\n"


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, source: Any) -> None:
        super().__init__()
        self.source = source


class Health(_Leaf):
    def render_GET(self, request: server.Request) -> bytes:
        missing = self.source.ready()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if missing is None:
            degraded = self.source.degraded()
            return b"ok\n" if degraded is None else f"degraded: {degraded}\n".encode("utf-8")
        request.setResponseCode(503)
        return f"not ready: {missing}\n".encode("utf-8")


class Metrics(_Leaf):
    def render_GET(self, request: server.Request) -> bytes:
        accept = request.getHeader(b"accept")
        encode, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return encode(self.source.registry)


class Status(_Leaf):
    def render_GET(self, request: server.Request) -> bytes:
        return json_body(request, self.source.status())


class JsonLeaf(resource.Resource):
    """C{GET}: the JSON of what C{produce()} returns."""

    isLeaf = True

    def __init__(self, produce: Callable[[], Any]) -> None:
        super().__init__()
        self.produce = produce

    def render_GET(self, request: server.Request) -> bytes:
        return json_body(request, self.produce())


class Tables(resource.Resource):
    """
    C{GET /v1/tables/<table>}: the JSON object key -> value of a cached
    table, a value that is JSON text given parsed; 404 for a table that is
    not cached.

    @param rows: table name -> its C{key -> value} dict, or None when the
        table is not kept.
    """

    def __init__(self, rows: Callable[[str], dict[str, str] | None]) -> None:
        super().__init__()
        self.rows = rows

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return _Table(self.rows, path.decode("utf-8", "replace"))


class _Table(resource.Resource):
    isLeaf = True

    def __init__(self, rows: Callable[[str], dict[str, str] | None], table: str) -> None:
        super().__init__()
        self.rows = rows
        self.table = table

    def render_GET(self, request: server.Request) -> bytes:
        found = self.rows(self.table)
        if found is None:
            return json_body(request, {"error": f"table {self.table!r} is not cached"}, 404)
        return json_body(request, {key: json_or_text(value) for key, value in found.items()})


def json_or_text(value: str) -> Any:
    """C{value} parsed as JSON, or C{value} itself when it is not JSON (a
    row's value as C{/v1/tables} shows it)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


class StatusRoot(resource.Resource):
    """
    C{/healthz}, C{/metrics} and C{/v1/status} of C{source}; L{v1} is the
    C{/v1} resource, for more children.
    """

    def __init__(self, source: Any) -> None:
        super().__init__()
        self.putChild(b"healthz", Health(source))
        self.putChild(b"metrics", Metrics(source))
        self.v1 = resource.Resource()
        self.v1.putChild(b"status", Status(source))
        self.putChild(b"v1", self.v1)


def listen(
    reactor: Any, endpoint: str, root: resource.Resource
) -> defer.Deferred[IListeningPort]:
    """
    Serve C{root} on the Twisted server endpoint string C{endpoint}, with
    C{reactor}.

    @return: Deferred firing with the listening port (stop it with
        C{stopListening}); errbacks when the endpoint cannot listen.
    """
    site = server.Site(root)
    site.displayTracebacks = False
    return endpoints.serverFromString(reactor, endpoint).listen(site)
