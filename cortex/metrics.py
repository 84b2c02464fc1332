"""Prometheus metrics of cortex, prefixed ``helexa_gateway_``, served on the metrics port.

Every latency is a real histogram with buckets chosen for it: time to first token spans a
warm prefill (tens of ms) to a cold placement (minutes); whole requests run to many minutes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
_PLACEMENT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

REQUESTS = Counter(
    "helexa_gateway_requests",
    "HTTP requests answered, by route, model and status",
    ["route", "model", "status"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "helexa_gateway_time_to_first_token_seconds",
    "From a streamed request's arrival at cortex to its first token from a neuron (placement "
    "included); non-streaming requests get their tokens together, see request_duration_seconds",
    ["model"],
    buckets=_TTFT_BUCKETS,
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "helexa_gateway_request_duration_seconds",
    "From a request's arrival at cortex to its last byte",
    ["route", "model"],
    buckets=_E2E_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "helexa_gateway_requests_in_flight",
    "Generation requests cortex is relaying, by neuron",
    ["neuron"],
    registry=REGISTRY,
)
NEURON_UP = Gauge(
    "helexa_gateway_neuron_up",
    "1 when the neuron answers its polls and is not draining",
    ["neuron"],
    registry=REGISTRY,
)
NEURON_DRAINING = Gauge(
    "helexa_gateway_neuron_draining",
    "1 when the neuron is draining (it reports so, or an admin drained it in cortex)",
    ["neuron"],
    registry=REGISTRY,
)
MODELS_LOADED = Gauge(
    "helexa_gateway_models_loaded",
    "Models READY on each neuron, as of the last poll",
    ["neuron"],
    registry=REGISTRY,
)
PLACEMENTS = Counter(
    "helexa_gateway_placements",
    "Model placements (LoadModel on a neuron), by model, neuron and result",
    ["model", "neuron", "result"],
    registry=REGISTRY,
)
PLACEMENT_SECONDS = Histogram(
    "helexa_gateway_placement_seconds",
    "Time to place a model, evictions included",
    ["model"],
    buckets=_PLACEMENT_BUCKETS,
    registry=REGISTRY,
)
EVICTIONS = Counter(
    "helexa_gateway_evictions",
    "Models unloaded to make room for another, by model and neuron",
    ["model", "neuron"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "helexa_gateway_retries",
    "Requests retried on another neuron before their first token, by the gRPC code",
    ["model", "code"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "helexa_gateway_rejections",
    "Requests refused without reaching a neuron, by reason",
    ["reason"],
    registry=REGISTRY,
)

CONSTRAINED = Counter(
    "helexa_gateway_constrained_requests",
    "Generation requests whose output the neuron constrains, by kind: json_object, "
    "json_schema, tools (tools offered and tool_choice not none)",
    ["kind"],
    registry=REGISTRY,
)

PREFIX_ROUTES = Counter(
    "helexa_gateway_prefix_routes",
    "Requests routed by the cache_aware policy among several neurons, by result: cached (to "
    "the neuron that last served the prompt's longest beginning), balanced (that neuron was "
    "too busy: to the least loaded), unseen (no beginning known: to the least loaded)",
    ["result"],
    registry=REGISTRY,
)
RESUMPTIONS = Counter(
    "helexa_gateway_resumptions",
    "Generations whose neuron failed mid-way, by what came of going on elsewhere: resumed, "
    "failed (no neuron could take it), not_resumable (tools, a JSON format, or switched off)",
    ["result"],
    registry=REGISTRY,
)
# Each result exported from the start, at 0 (a panel has its series before the first).
for _result in ("cached", "balanced", "unseen"):
    PREFIX_ROUTES.labels(result=_result)
for _result in ("resumed", "failed", "not_resumable"):
    RESUMPTIONS.labels(result=_result)
STREAMED_TOKENS = Counter(
    "helexa_gateway_streamed_tokens",
    "Tokens of the streams cortex relayed to their end, by model",
    ["model"],
    registry=REGISTRY,
)
STREAM_WRITES = Counter(
    "helexa_gateway_stream_writes",
    "Writes to streaming clients (each one socket send of SSE events), by model: streamed "
    "tokens over writes is how many tokens a write carried",
    ["model"],
    registry=REGISTRY,
)


def serve(address: str) -> None:
    """Serve /metrics on ``address`` (HOST:PORT) from a daemon thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host, registry=REGISTRY)
