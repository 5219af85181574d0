"""``GET /metrics``, with vLLM's names intact in OpenMetrics (served ahead of KServe's handler).

Prometheus 2.x asks for OpenMetrics 1.0.0 without naming an escaping scheme, which
prometheus-client (>= 0.23) takes as "underscores". Its OpenMetrics writer then escapes sample
names with the *label*-name rule, where ``:`` is invalid, but the TYPE / HELP lines with the
metric-name rule, where it is valid (prometheus/client_python#1177). The scrape gets
``# TYPE vllm:num_requests_running gauge`` followed by ``vllm_num_requests_running{...} 0``, and
Prometheus stores no ``vllm:*`` series: dashboards and autoscalers keyed on vLLM's names see
nothing.

Escaping is only meant for names outside the classic character set ``[a-zA-Z_:][a-zA-Z0-9_:]*``,
and colons are inside it. So every metric name is escaped here with the metric-name rule first
(a no-op for all of ours) and the result written with ``allow-utf-8``, which writes valid names as
they are: the output is what the negotiated escaping asks for, TYPE and samples agreeing. The
content type still states the escaping that was negotiated. The classic text format (KServe's
default) has no such bug and is left to prometheus-client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.samples import Sample

from runtime.metrics import exposition_registry


class _EscapedNames(Collector):
    """``registry``'s metrics with every metric (and sample) name escaped by ``escaping``'s
    metric-name rule; label names are left to the writer (its label rule is the right one)."""

    def __init__(self, registry: Any, escaping: str) -> None:
        self._registry = registry
        self._escaping = escaping

    def _name(self, name: str) -> str:
        return om.escape_metric_name(name, self._escaping)

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            renamed = Metric(self._name(metric.name), metric.documentation, metric.type, metric.unit)
            renamed.samples = [Sample(self._name(s.name), *s[1:]) for s in metric.samples]
            yield renamed


def _negotiated(content_type: str) -> tuple[str, str]:
    """(escaping, version) stated by the OpenMetrics content type ``choose_encoder`` picked
    (without an escaping parameter it wrote underscores, as it does for a bare version)."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    return params.get("escaping", om.UNDERSCORES), params.get("version", "1.0.0")


def render_metrics(accept: str | None, registry: Any = REGISTRY) -> tuple[bytes, str]:
    """(body, content type) of ``registry`` for a scrape sending ``accept``."""
    encoder, content_type = exposition.choose_encoder(accept or "")
    if content_type.startswith("application/openmetrics-text"):
        escaping, version = _negotiated(content_type)
        if escaping != om.ALLOWUTF8:
            return om.generate_latest(_EscapedNames(registry, escaping), escaping=om.ALLOWUTF8,
                                      version=version), content_type
    return encoder(registry), content_type


def register_metrics_route(app: FastAPI) -> None:
    """Serve ``/metrics``; call before KServe registers its own (FastAPI matches in order)."""

    async def metrics(request: Request) -> Response:
        body, content_type = render_metrics(request.headers.get("accept"), exposition_registry())
        return Response(content=body, headers={"content-type": content_type})

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
