"""Bad input, generated: thousands of malformed and edge-case requests to a real cortex (HTTP)
and a real neuron (gRPC). Every answer is a success or a well-formed refusal naming what is
wrong (cortex: a 4xx in OpenAI's envelope; neuron: INVALID_ARGUMENT or NOT_FOUND with a
message), never a 500, INTERNAL or UNKNOWN, never a dropped connection; both keep serving.

Generation stays cheap: a request for the real model always carries max_tokens of at most 2
(or a wrong one); most of the rest name an unknown model, which cortex refuses only after
checking every other field.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import urllib.parse
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import DEMO_ID, CortexProcess, NeuronProcess

HTTP_EXAMPLES = 2000
GRPC_EXAMPLES = 600
ALIAS = "smol"  # the shared cortex's alias of the demo model
# Examples are not saved between runs, nor judged by speed (a generation takes what it takes).
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

# Any JSON value, odd ones included: huge and negative numbers, NaN and infinities (Python's
# json writes them), deep-ish nesting, text with every kind of character, lone surrogates too.
ODD_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | ODD_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, else ``odd``: enough requests get through to generate."""
    return st.integers(0, 9).flatmap(lambda i: odd if i == 0 else valid)


CHEAP_MAX = mostly(
    st.integers(1, 2), st.integers(max_value=0) | st.integers(min_value=-(2**70), max_value=3)
)
ROLES = mostly(st.sampled_from(["system", "developer", "user", "assistant"]), ODD_TEXT | JSON)
PART = st.fixed_dictionaries({"type": st.just("text"), "text": ODD_TEXT})
CONTENT = mostly(ODD_TEXT | st.lists(PART, max_size=3), st.lists(PART | JSON, max_size=3) | JSON)
MESSAGE = mostly(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), JSON)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    # An unknown model is refused after every other field is checked: cheap, and as thorough.
    "model": st.integers(0, 9).flatmap(
        lambda i: st.sampled_from([DEMO_ID, ALIAS]) if i < 2 else st.just("no-such-model") | JSON
    ),
    "max_tokens": mostly(CHEAP_MAX, JSON),
    "max_completion_tokens": mostly(CHEAP_MAX, JSON),
    "temperature": mostly(st.floats(0, 2), JSON),
    "top_p": mostly(st.floats(0, 1, exclude_min=True), JSON),
    "seed": mostly(st.integers(), JSON),
    "stop": mostly(ODD_TEXT.filter(bool) | st.lists(ODD_TEXT.filter(bool), max_size=3), JSON),
    "n": mostly(st.just(1), st.integers() | JSON),
    "user": mostly(ODD_TEXT, JSON),
    "stream": mostly(st.booleans(), JSON),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
}
CHAT_BODY = st.fixed_dictionaries(
    {"model": FIELDS["model"], "messages": mostly(st.lists(MESSAGE, max_size=4), JSON)},
    optional={k: v for k, v in FIELDS.items() if k != "model"},
)
COMPLETION_BODY = st.fixed_dictionaries(
    {
        "model": FIELDS["model"],
        "prompt": mostly(ODD_TEXT | st.lists(ODD_TEXT, max_size=2), JSON),
    },
    optional={k: v for k, v in FIELDS.items() if k != "model"},
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ]
)


def _cheap(body: Any) -> Any:
    """A body for the real model never asks for more than 2 tokens (or asks wrongly)."""
    if isinstance(body, dict) and body.get("model") in (DEMO_ID, ALIAS):
        for key in ("max_completion_tokens", "max_tokens"):  # cortex's order
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value > 2:
                body[key] = 2
            break
        else:
            body["max_tokens"] = 2
    return body


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: a lone surrogate goes out as \\ud800


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, str]:
    """(method, path, body, content type)."""
    kind = draw(st.sampled_from(["chat"] * 6 + ["completion"] * 3 + ["raw", "route"]))
    content_type = draw(CONTENT_TYPES)
    if kind == "chat":
        return "POST", CHAT, _encode(_cheap(draw(CHAT_BODY))), content_type
    if kind == "completion":
        return "POST", COMPLETIONS, _encode(_cheap(draw(COMPLETION_BODY))), content_type
    if kind == "raw":  # not JSON, cut short, not an object, nested deep
        valid = _encode({"model": DEMO_ID, "messages": [{"role": "user", "content": "x"}]})
        raw = draw(
            st.binary(max_size=64)
            | st.integers(1, len(valid) - 1).map(lambda n: valid[:n])
            | JSON.map(_encode)
            | st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)
        )
        return "POST", draw(st.sampled_from([CHAT, COMPLETIONS])), raw, content_type
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    path = draw(
        st.sampled_from([CHAT, COMPLETIONS, "/v1/models", "/v1/nothing", "/v1", "/"])
        | ODD_TEXT.map(lambda t: "/v1/models/" + urllib.parse.quote(t, safe="", errors="replace"))
    )
    return method, path, b"" if method == "GET" else draw(JSON.map(_encode)), content_type


def _check_answer(status: int, content_type: str, raw: bytes) -> None:
    assert status < 500, (status, raw[:300])
    if status >= 400:
        assert content_type.startswith("application/json"), content_type
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str), error
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] is None or isinstance(error["code"], str), error
        return
    assert status == 200, status
    if content_type.startswith("text/event-stream"):
        events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]", raw[-300:]
        assert not any(b'"error"' in e for e in events), raw[-300:]
        return
    body = json.loads(raw)
    assert "choices" in body or "data" in body or body.get("object") == "model", body


def _fuzz_http(cortex: CortexProcess) -> dict[int, int]:
    host, port = cortex.config["listen"].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=HTTP_EXAMPLES)
    @given(requests())
    def check(request: tuple[str, str, bytes, str]) -> None:
        method, path, body, content_type = request
        headers = {"Content-Type": content_type} if content_type else {}
        # A dropped connection raises here (RemoteDisconnected, ConnectionResetError).
        connection.request(method, path, body=body, headers=headers)
        reply = connection.getresponse()
        raw = reply.read()
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        _check_answer(reply.status, reply.getheader("Content-Type") or "", raw)
        assert not reply.will_close, "cortex closed the connection after answering"

    try:
        check()
    finally:
        connection.close()
    return statuses


async def test_thousands_of_malformed_http_requests_get_4xx_envelopes_or_answers(
    shared_cortex: CortexProcess,
) -> None:
    cortex = shared_cortex
    statuses = await asyncio.to_thread(_fuzz_http, cortex)
    print(f"\nfuzz http: {sum(statuses.values())} requests, statuses {sorted(statuses.items())}")
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0
    assert cortex.proc is not None and cortex.proc.poll() is None


ODD_FLOATS = st.floats(width=32) | st.sampled_from([-0.0, 1e-45, 1e-30, 3e38])
GENERATE = st.fixed_dictionaries(
    {
        "model": mostly(st.just(DEMO_ID), st.just("no-such-model") | st.text(max_size=20)),
        "max_tokens": mostly(st.integers(1, 2), st.integers(-(2**31), 0)),
    },
    optional={
        "temperature": mostly(st.floats(0, 2, width=32), ODD_FLOATS),
        "top_p": mostly(st.floats(0, 1, exclude_min=True, width=32), ODD_FLOATS),
        "top_k": st.integers(0, 2**32 - 1),
        "seed": st.integers(0, 2**64 - 1),
        "stop": mostly(st.lists(st.text(min_size=1, max_size=8), max_size=4), st.lists(st.text())),
        "repetition_penalty": mostly(st.floats(0.5, 2, width=32), ODD_FLOATS),
        "queue_timeout": mostly(st.floats(0, 60), st.floats()),
        "request_id": st.text(max_size=20),
    },
)
MESSAGES = st.lists(
    st.builds(
        pb.ChatMessage,
        role=mostly(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=8)),
        content=st.text(max_size=60),
    ),
    max_size=4,
)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(**draw(GENERATE))
    kind = draw(st.sampled_from(["chat", "prompt", "none"]))
    if kind == "chat":
        request.chat.CopyFrom(pb.ChatMessages(messages=draw(MESSAGES)))
    elif kind == "prompt":
        request.prompt = draw(st.text(max_size=60))
    return request


def _fuzz_grpc(endpoint: str) -> dict[str, int]:
    codes: dict[str, int] = {}
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.NeuronStub(channel)

        @settings(FUZZ, max_examples=GRPC_EXAMPLES)
        @given(generate_requests())
        def check(request: pb.GenerateRequest) -> None:
            try:
                replies = list(stub.Generate(request, timeout=120))
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
                codes[code.name] = codes.get(code.name, 0) + 1
                assert code in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ), (code, details, request)
                assert details, (code, request)
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # only a tiny queue_timeout
                    assert "queue_timeout" in details and request.queue_timeout < 1, details
                return
            codes["OK"] = codes.get("OK", 0) + 1
            last = replies[-1]
            assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            assert 0 < last.usage.completion_tokens <= 2
            assert math.isfinite(request.temperature)  # an infinite one must have been refused

        check()
    return codes


async def test_thousands_of_malformed_generate_calls_are_refused_by_name_never_internal(
    shared_neuron: NeuronProcess,
) -> None:
    await shared_neuron.wait_serving()
    codes = await asyncio.to_thread(_fuzz_grpc, shared_neuron.endpoint)
    print(f"\nfuzz grpc: {sum(codes.values())} calls, codes {sorted(codes.items())}")
    assert codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0
    assert shared_neuron.proc is not None and shared_neuron.proc.poll() is None
