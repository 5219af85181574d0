"""Prometheus metrics with vLLM's names, served on KServe's ``/metrics`` (KServe's own
``request_*_seconds`` histograms and the default process/platform collectors stay as they are).

Every series is labelled ``model_name`` (the model's primary name):

* gauges read from the engine's latest ``EngineStats`` at scrape time:
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``;
* counters that the engine core keeps cumulatively (``EngineStats``), exported as they are by a
  custom collector (so they never double-count): ``vllm:num_preemptions_total``,
  ``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total`` (in tokens, as vLLM);
* counters and histograms fed by the front end as requests run (``engine.async_llm.StatLogger``):
  ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:request_success_total{finished_reason="stop"|"length"|"abort"}`` (one per sample),
  ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``,
  ``vllm:request_prefill_time_seconds``, ``vllm:request_decode_time_seconds``,
  ``vllm:request_prompt_tokens``, ``vllm:request_generation_tokens``;
* ours: ``vlmserve:images_processed_total`` and ``vlmserve:image_preprocess_seconds`` (the
  engine's multimodal preprocessing of one request, HF image processor included; image download
  and decoding happen earlier, while the chat is rendered).

Prompt tokens count the image placeholder tokens (as ``usage.prompt_tokens`` does) and are counted
once per request when its first token arrives; aborted requests count in
``request_success_total{finished_reason="abort"}`` but not in the latency histograms.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from engine.async_llm import AsyncLLM
from engine.stats import FinishedRequestStats, IterationStats, StatLogger
from runtime import metrics_multiprocess

# (name, help, EngineStats attribute)
_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "num_running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
)
# Cumulative in EngineStats (name without _total, help, attribute).
_ENGINE_COUNTERS = (
    ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", "num_preemptions"),
    ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", "prefix_queries"),
    ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_hits"),
)
FINISH_REASONS = ("stop", "length", "abort")

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
IMAGE_PREPROCESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


# The token-count histograms cannot know every model's max_model_len when they are created.
TOKEN_BUCKETS = build_1_2_5_buckets(1_000_000)


class EngineStatsCollector(Collector):
    """Gauges and cumulative counters from each model's latest ``EngineStats``;
    ``models()`` yields (model_name, model)."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        self._models = models

    def _families(self) -> tuple[list[tuple[Any, str]], list[tuple[Any, str]]]:
        gauges = [(GaugeMetricFamily(name, doc, labels=["model_name"]), attr) for name, doc, attr in _GAUGES]
        counters = [(CounterMetricFamily(name, doc, labels=["model_name"]), attr) for name, doc, attr in _ENGINE_COUNTERS]
        return gauges, counters

    def describe(self) -> Iterator[Any]:
        gauges, counters = self._families()
        for family, _ in gauges + counters:
            yield family

    def collect(self) -> Iterator[Any]:
        gauges, counters = self._families()
        for model_name, model in self._models():
            stats = getattr(model, "stats", None)
            if stats is None:
                continue
            for family, attr in gauges + counters:
                family.add_metric([model_name], float(getattr(stats, attr, 0) or 0))
        for family, _ in gauges + counters:
            yield family


class RequestMetrics:
    """The front end's counters and histograms (prometheus_client objects, one set per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        label = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=registry)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", label,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", label,
                                         registry=registry)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       label + ["finished_reason"], registry=registry)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                          TOKEN_BUCKETS)
        self.request_generation_tokens = hist("vllm:request_generation_tokens",
                                              "Number of generation tokens processed.", TOKEN_BUCKETS)
        self.images = Counter("vlmserve:images_processed", "Number of images preprocessed for the model.", label,
                              registry=registry)
        self.image_preprocess = hist("vlmserve:image_preprocess_seconds",
                                     "Histogram of a request's image preprocessing time in seconds.",
                                     IMAGE_PREPROCESS_BUCKETS)


class PrometheusStatLogger(StatLogger):
    """One engine's statistics into ``RequestMetrics``, labelled with its model's name."""

    def __init__(self, metrics: RequestMetrics, model_name: str) -> None:
        m, label = metrics, model_name
        self.prompt_tokens = m.prompt_tokens.labels(label)
        self.generation_tokens = m.generation_tokens.labels(label)
        self.success = {reason: m.request_success.labels(label, reason) for reason in FINISH_REASONS}
        self._success_family, self._label = m.request_success, label
        self.ttft, self.itl, self.e2e = m.ttft.labels(label), m.itl.labels(label), m.e2e.labels(label)
        self.queue_time, self.prefill_time = m.queue_time.labels(label), m.prefill_time.labels(label)
        self.decode_time = m.decode_time.labels(label)
        self.request_prompt_tokens = m.request_prompt_tokens.labels(label)
        self.request_generation_tokens = m.request_generation_tokens.labels(label)
        self.images, self.image_preprocess = m.images.labels(label), m.image_preprocess.labels(label)

    def record_preprocess(self, num_images: int, seconds: float) -> None:
        self.images.inc(num_images)
        self.image_preprocess.observe(seconds)

    def record_iteration(self, stats: IterationStats) -> None:
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.inc(stats.num_generation_tokens)
        for value in stats.time_to_first_tokens:
            self.ttft.observe(value)
        for value in stats.inter_token_latencies:
            self.itl.observe(value)

    def record_finished(self, stats: FinishedRequestStats) -> None:
        for reason in stats.finish_reasons:
            counter = self.success.get(reason)
            if counter is None:
                counter = self.success[reason] = self._success_family.labels(self._label, reason)
            counter.inc()
        if stats.e2e_latency is None:  # aborted
            return
        self.e2e.observe(stats.e2e_latency)
        self.queue_time.observe(stats.queue_time)
        self.prefill_time.observe(stats.prefill_time)
        self.decode_time.observe(stats.decode_time)
        self.request_prompt_tokens.observe(stats.num_prompt_tokens)
        self.request_generation_tokens.observe(stats.num_generation_tokens)


class ProcessInfoCollector(Collector):
    """``vlmserve:api_server_info{pid}``: which API server process answered this scrape (with
    ``--api-server-count N`` the kernel picks one; the request metrics are every process's sum)."""

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("vlmserve:api_server_info", "The API server process that answered (1)",
                                   labels=["pid"])
        family.add_metric([str(os.getpid())], 1.0)
        yield family


# Collectors that read this process's state (the engine core's latest statistics, the pid): served
# beside the multiprocess files' sums, which hold only counters, histograms and gauges of objects.
_served_here: list[Collector] = []
_multiprocess_registry: CollectorRegistry | None = None


def exposition_registry() -> CollectorRegistry:
    """What ``/metrics`` serves: the default registry, or with several API server processes
    (``runtime.metrics_multiprocess``) every process's request metrics summed, plus this one's
    engine gauges."""
    global _multiprocess_registry
    if not metrics_multiprocess.enabled():
        return REGISTRY
    with _lock:
        if _multiprocess_registry is None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            for collector in _served_here:
                registry.register(collector)
            _multiprocess_registry = registry
        return _multiprocess_registry


_lock = threading.Lock()
_request_metrics: dict[int, RequestMetrics] = {}  # id(registry) -> its metrics (created once)


def request_metrics(registry: CollectorRegistry = REGISTRY) -> RequestMetrics:
    with _lock:
        metrics = _request_metrics.get(id(registry))
        if metrics is None:
            metrics = _request_metrics[id(registry)] = RequestMetrics(registry)
        return metrics


def _model_name_of(llm: Any, models: Callable[[], Iterable[tuple[str, Any]]]) -> str:
    """The name of the model whose engine ``llm`` is (models build their engine from their own
    ``engine_args``); else the engine's served name or path."""
    for name, model in models():
        if getattr(model, "engine_args", None) is llm.engine_args or getattr(model, "llm", None) is llm:
            return name
    args = llm.engine_args
    return str(getattr(args, "served_model_name", None) or args.model)


def register_engine_metrics(models: Callable[[], Iterable[tuple[str, Any]]],
                            registry: CollectorRegistry = REGISTRY) -> EngineStatsCollector:
    """Export the engine gauges/counters of ``models()`` (pairs (model_name, model)) and feed the
    request metrics from every ``AsyncLLM`` built in this process from now on."""
    collector = EngineStatsCollector(models)
    registry.register(collector)
    registry.register(ProcessInfoCollector())
    metrics = request_metrics(registry)
    if registry is REGISTRY:
        _served_here.extend([collector, ProcessInfoCollector()])

    def factory(llm: Any) -> StatLogger:
        return PrometheusStatLogger(metrics, _model_name_of(llm, models))

    AsyncLLM.default_stat_loggers.append(factory)
    return collector
