"""Prometheus metrics with vLLM's names, served on KServe's ``/metrics``.

This first stage exports the engine's gauges, read from ``EngineStats`` at scrape time (no
background task): ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
``vllm:kv_cache_usage_perc``, labelled ``model_name``. Counters and latency histograms
(``vllm:prompt_tokens_total``, ``vllm:time_to_first_token_seconds``, ...) plug in here later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

# (name, help, EngineStats attribute)
_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "num_running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
)


class EngineStatsCollector(Collector):
    """Gauges from each model's latest ``EngineStats``; ``models()`` yields (model_name, model)."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._models = models

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, doc, _ in _GAUGES:
            yield GaugeMetricFamily(name, doc, labels=["model_name"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = [(GaugeMetricFamily(name, doc, labels=["model_name"]), attr) for name, doc, attr in _GAUGES]
        for model_name, model in self._models():
            stats = getattr(model, "stats", None)
            if stats is None:
                continue
            for family, attr in families:
                family.add_metric([model_name], float(getattr(stats, attr, 0) or 0))
        for family, _ in families:
            yield family


def register_engine_metrics(models: Callable[[], Iterable[tuple[str, Any]]],
                            registry: CollectorRegistry = REGISTRY) -> EngineStatsCollector:
    collector = EngineStatsCollector(models)
    registry.register(collector)
    return collector
