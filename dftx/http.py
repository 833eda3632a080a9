"""
The status and metrics HTTP resource both services serve on C{http_endpoint}:

- C{GET /healthz}: C{200 ok} once the service is ready (subscribed, initial
  load done), C{503} with the reason before.
- C{GET /metrics}: Prometheus text format (version 0.0.4).
- C{GET /v1/status}: JSON; what the service says about itself (role,
  publisher id, cluster topology, subscriptions, counters).

A service provides an L{IStatusSource}; L{StatusRoot} renders it, and more
resources hang under C{/v1} with C{root.v1.putChild(b"tables", resource)}.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server
from zope.interface import Interface

__all__ = [
    "IStatusSource", "JsonLeaf", "Metric", "StatusRoot", "Tables", "json_body", "listen",
    "render_metrics",
]

JSON = b"application/json"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metric:
    """
    One Prometheus metric family: C{kind} is C{"counter"} or C{"gauge"};
    C{samples} are (labels, value) pairs.
    """

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, value))
        return self


class IStatusSource(Interface):
    """What a service tells the HTTP resource."""

    def ready():
        """@return: None when ready, otherwise text saying what is missing."""

    def status():
        """@return: a JSON-ready dict (GET /v1/status)."""

    def metrics():
        """@return: an iterable of L{Metric}."""


def render_metrics(metrics: Iterable[Metric]) -> bytes:
    """The Prometheus text exposition of C{metrics}."""
    lines = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {_escape_help(m.help)}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in m.samples:
            label_text = ",".join(f'{k}="{_escape_label(str(v))}"'
                                  for k, v in sorted(labels.items()))
            name = f"{m.name}{{{label_text}}}" if label_text else m.name
            lines.append(f"{name} {_number(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return _escape_help(text).replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


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
            return b"ok\n"
        request.setResponseCode(503)
        return f"not ready: {missing}\n".encode("utf-8")


class Metrics(_Leaf):
    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", PROMETHEUS)
        return render_metrics(self.source.metrics())


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
