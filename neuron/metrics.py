"""Prometheus metrics of the neuron, prefixed ``helexa_neuron_``, served on the metrics port.

Buckets are chosen per metric: inter-token latency lives in milliseconds, cold loads in
minutes, so no metric uses the client's default buckets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

REQUESTS = Counter(
    "helexa_neuron_requests",
    "Generate requests finished, by model and finish reason",
    ["model", "finish_reason"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "helexa_neuron_time_to_first_token_seconds",
    "From a request's arrival to its first generated token",
    ["model"],
    buckets=_TTFT_BUCKETS,
    registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "helexa_neuron_inter_token_latency_seconds",
    "Time between consecutive tokens of one request",
    ["model"],
    buckets=_ITL_BUCKETS,
    registry=REGISTRY,
)
END_TO_END = Histogram(
    "helexa_neuron_request_duration_seconds",
    "From a request's arrival to its last token",
    ["model"],
    buckets=_E2E_BUCKETS,
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "helexa_neuron_queue_seconds",
    "Time a request waited for a batch slot",
    ["model"],
    buckets=_QUEUE_BUCKETS,
    registry=REGISTRY,
)
PREFILL_BATCH = Histogram(
    "helexa_neuron_prefill_batch_size",
    "Prompts run together in one prefill",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    "helexa_neuron_prompt_tokens", "Prompt tokens processed", ["model"], registry=REGISTRY
)
PREFIX_CACHE_HITS = Counter(
    "helexa_neuron_prefix_cache_hit_tokens",
    "Prompt tokens whose keys and values came from the prefix cache instead of being run",
    ["model"],
    registry=REGISTRY,
)
PREFIX_CACHE_BYTES = Gauge(
    "helexa_neuron_prefix_cache_bytes",
    "Memory of a loaded model's KV cache blocks that hold a known prompt beginning, held by "
    "running requests or idle (engine.prefix_cache bounds the idle ones)",
    ["model"],
    registry=REGISTRY,
)
KV_CACHE_USAGE = Gauge(
    "helexa_neuron_kv_cache_usage",
    "Fraction of a loaded model's KV cache blocks that running requests hold",
    ["model"],
    registry=REGISTRY,
)
PREEMPTIONS = Counter(
    "helexa_neuron_preemptions",
    "Running requests sent back to wait (their tokens run again later) because the KV "
    "cache had no block for the next step",
    ["model"],
    registry=REGISTRY,
)
CONSTRAINED = Counter(
    "helexa_neuron_constrained_requests",
    "Requests generated under a constraint, by kind (json_object, json_schema, tools_auto, "
    "tools_required, tools_function)",
    ["model", "kind"],
    registry=REGISTRY,
)
GRAMMAR_COMPILE_SECONDS = Histogram(
    "helexa_neuron_grammar_compile_seconds",
    "Compiling a constraint to a grammar (a cached one answers at once)",
    ["model", "kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
MASK_SECONDS = Histogram(
    "helexa_neuron_grammar_mask_seconds",
    "Building and applying the grammar masks of one step's constrained rows",
    ["model"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
    registry=REGISTRY,
)
GENERATION_TOKENS = Counter(
    "helexa_neuron_generation_tokens", "Tokens generated", ["model"], registry=REGISTRY
)
DRAFT_TOKENS = Counter(
    "helexa_neuron_speculative_draft_tokens",
    "Draft tokens proposed by prompt lookup and run in a verifying step (speculative decoding)",
    ["model"],
    registry=REGISTRY,
)
ACCEPTED_TOKENS = Counter(
    "helexa_neuron_speculative_accepted_tokens",
    "Draft tokens the model agreed with and kept; the acceptance rate is this over "
    "speculative_draft_tokens",
    ["model"],
    registry=REGISTRY,
)
RUNNING = Gauge(
    "helexa_neuron_requests_running", "Requests in a running batch", ["model"], registry=REGISTRY
)
WAITING = Gauge(
    "helexa_neuron_requests_waiting",
    "Requests waiting for a batch slot",
    ["model"],
    registry=REGISTRY,
)
LOAD_SECONDS = Histogram(
    "helexa_neuron_model_load_seconds",
    "Time to load a model, files included",
    ["model"],
    buckets=_LOAD_BUCKETS,
    registry=REGISTRY,
)
RESIDENT_BYTES = Gauge(
    "helexa_neuron_model_resident_bytes",
    "Memory a loaded model's weights take",
    ["model", "device"],
    registry=REGISTRY,
)
LOADS = Counter(
    "helexa_neuron_model_loads", "Model loads, by result", ["model", "result"], registry=REGISTRY
)
UNLOADS = Counter("helexa_neuron_model_unloads", "Model unloads", ["model"], registry=REGISTRY)
MODELS_LOADING = Gauge("helexa_neuron_models_loading", "Models being loaded now", registry=REGISTRY)
DOWNLOADED_BYTES = Counter(
    "helexa_neuron_downloaded_bytes",
    "Bytes of model files downloaded from the Hugging Face Hub into cache_dir",
    registry=REGISTRY,
)
DEVICE_FREE_BYTES = Gauge(
    "helexa_neuron_device_free_bytes",
    "Memory free for models on a device",
    ["device"],
    registry=REGISTRY,
)
DEVICE_TOTAL_BYTES = Gauge(
    "helexa_neuron_device_total_bytes",
    "Memory models may use on a device",
    ["device"],
    registry=REGISTRY,
)
DRAINING = Gauge(
    "helexa_neuron_draining", "1 while the neuron drains for shutdown", registry=REGISTRY
)


def serve(address: str) -> None:
    """Serve /metrics on ``HOST:PORT`` from a background thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host, registry=REGISTRY)
