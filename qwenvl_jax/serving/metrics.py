"""`GET /metrics`: the server's state and counters in Prometheus' text format (prometheus_client), what vLLM's
`/metrics` gives a scraper: requests running and waiting, finished by reason, tokens, the device's busy seconds,
JAX's compile events (which must not grow after warm-up), the HTTP layer's refusals, and histograms of the time to
first token and of request latency.

The counts the engine and the HTTP limits already keep (`Engine.stats`, `RequestLimits.stats`,
`ConnectionLimits.stats`) are read at scrape time by a collector, not counted twice; only the per-request timings,
which nothing else keeps, are observed here (`ServerMetrics.first_token`, `ServerMetrics.finished`). Each app has a
registry of its own (tests and benches run several servers in one process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "qwenvl_"
# Seconds: a token of the tiny CPU model takes ~0.1 ms, a 7B prefill of thousands of tokens seconds.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Snapshot:
  """Metric families of the stats dicts at scrape time (`prometheus_client`'s custom-collector protocol)."""

  def __init__(self, engine, limits, connections):
    self._engine, self._limits, self._connections = engine, limits, connections

  def collect(self):
    stats = self._engine.stats()
    for name, key, doc in (("num_requests_running", "active", "requests holding a decode slot"),
                           ("num_requests_waiting", "waiting", "requests queued in the engine for a slot"),
                           ("decode_slots", "slots", "decode slots (serve's --num_slots)"),
                           ("context_tokens", "context", "cache slots per request (serve's --context)")):
      yield _gauge(name, doc, stats[key])
    yield _gauge("healthy", "1 while the engine thread serves, 0 after it failed", int(bool(stats["healthy"])))
    finished = CounterMetricFamily(PREFIX + "requests_finished", "requests that held a slot and ended, by reason",
                                   labels=["reason"])
    for reason in ("stop", "length", "cancelled"):
      finished.add_metric([reason], stats.get(f"finished_{reason}", 0))
    yield finished
    for name, key, doc in (("requests_admitted", "admitted", "requests given a decode slot"),
                           ("requests_cancelled_waiting", "cancelled_waiting", "requests whose client left before "
                            "they got a slot"),
                           ("decoded_tokens", "decoded_tokens", "tokens delivered by decode calls"),
                           ("prefills", "prefills", "prefill calls"),
                           ("prompts_shared", "prompts_shared", "requests admitted on a copy of another's prefilled "
                            "prompt (the n choices of one request)"),
                           ("decode_calls", "decode_calls", "decode calls")):
      yield CounterMetricFamily(PREFIX + name, doc, value=stats.get(key, 0))
    busy = CounterMetricFamily(PREFIX + "device_seconds", "wall seconds of the engine's device calls, by program "
                               "(prefill: image encoding and prefill)", labels=["program"])
    for program in ("decode", "prefill"):
      busy.add_metric([program], stats.get(f"{program}_seconds", 0.0))
    yield busy
    compiles = stats["compilations"]
    for name, doc, suffix in (("compilations", "JAX compile events of the engine thread", ""),
                              ("compilations_after_warmup", "JAX compile events after warm-up (0 while serving as "
                               "designed)", "_after_warmup")):
      family = CounterMetricFamily(PREFIX + name, doc, labels=["kind"])
      for kind in ("lowerings", "backend_compiles"):
        family.add_metric([kind], compiles.get(kind + suffix, 0))
      yield family
    http = {**self._limits.stats(), **self._connections.stats()}
    yield _gauge("open_http_requests", "completion requests being received, checked, queued or answered",
                 http.pop("open_requests", 0))
    http.pop("max_open_requests", None)
    events = CounterMetricFamily(PREFIX + "http_events", "requests refused (refused_busy: 429, refused_too_large: "
                                 "413, refused_*timeout: 408), answers cut and connections closed or reset by the "
                                 "limits", labels=["event"])
    for event, count in sorted(http.items()):
      events.add_metric([event], count)
    yield events


def _gauge(name: str, doc: str, value) -> GaugeMetricFamily:
  return GaugeMetricFamily(PREFIX + name, doc, value=value)


class ServerMetrics:
  """The registry behind one app's `/metrics`."""

  def __init__(self, engine, limits, connections):
    self.registry = CollectorRegistry(auto_describe=False)
    self.registry.register(_Snapshot(engine, limits, connections))
    self._ttft = Histogram(PREFIX + "time_to_first_token_seconds", "from the request's arrival to its first token",
                           buckets=_TTFT_BUCKETS, registry=self.registry)
    self._latency = Histogram(PREFIX + "e2e_request_latency_seconds", "from the request's arrival to its end (a "
                              "choice of n counts once), for requests that ended", buckets=_LATENCY_BUCKETS,
                              registry=self.registry)
    self._prompt = Counter(PREFIX + "prompt_tokens", "prompt tokens of ended requests (each choice of n counts its "
                           "prompt, which is prefilled once)", registry=self.registry)
    self._generated = Counter(PREFIX + "generation_tokens", "tokens generated by ended requests, stop tokens "
                              "included", registry=self.registry)

  def first_token(self, seconds: float) -> None:
    self._ttft.observe(seconds)

  def finished(self, seconds: float, prompt_tokens: int, generated_tokens: int) -> None:
    self._latency.observe(seconds)
    self._prompt.inc(prompt_tokens)
    self._generated.inc(generated_tokens)

  def render(self) -> bytes:
    return generate_latest(self.registry)
