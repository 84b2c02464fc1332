"""GenerateMany: many generations over one gRPC call to a real neuron with the real SmolLM2."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from tests.harness import (
    DEMO_ID,
    Many,
    NeuronProcess,
    chat,
    collect,
    demo_spec,
    endless,
    metric_value,
)

QUESTION = "What is the capital of France?"


async def test_generations_over_one_call_answer_as_their_own_generate_calls_do(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    # float32: greedy answers that do not depend on the batch around them.
    await shared_stub.LoadModel(pb.LoadModelRequest(spec=demo_spec("many", dtype="float32")))
    requests = {
        1: chat("many", QUESTION, max_tokens=16, temperature=0),
        2: chat("many", "Name three colours.", max_tokens=12, temperature=0),
        3: pb.GenerateRequest(model="many", prompt="1, 2, 3,", max_tokens=9, temperature=0),
        4: chat("many", "What is 2 plus 2?", max_tokens=10, temperature=0, message_interval=60),
    }
    alone = {i: await collect(shared_stub, r) for i, r in requests.items()}
    many = Many(shared_stub)
    await many.start({i: requests[i] for i in (1, 2, 3)})
    await many.read_until(lambda: many.responded(1))
    await many.start({4: requests[4]})  # joins while the others run
    await many.read_until(lambda: all(many.over(i) for i in requests))
    await many.call.done_writing()
    assert await many.call.read() is grpc.aio.EOF
    assert await many.call.code() == grpc.StatusCode.OK

    for i, (text, last, _) in alone.items():
        events = many.events[i]
        assert events[0].accepted, events[0]
        assert many.text(i) == text, i
        final = events[-1].response
        # Usage but for the cached prompt tokens (the prefix cache holds the prompt by now).
        got = (final.finish_reason, final.usage.prompt_tokens, final.usage.completion_tokens)
        assert got == (last.finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens)
        assert sum(e.response.tokens for e in events) == last.usage.completion_tokens, i
    assert "Paris" in many.text(1)
    # Several generations' events share a message (the three accepts, at least).
    assert max(len({e.id for e in m.events}) for m in many.messages) >= 3
    await shared_stub.UnloadModel(pb.UnloadModelRequest(id="many"))


async def test_a_refused_request_is_an_error_event_and_the_others_go_on(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    many = Many(shared_stub)
    await many.start(
        {
            1: chat(DEMO_ID, QUESTION, max_tokens=8, temperature=0),
            2: chat("no-such-model", QUESTION),
            3: chat(DEMO_ID, QUESTION, max_tokens=0),
            4: chat("", QUESTION),
            5: pb.GenerateRequest(model=DEMO_ID),
        }
    )
    await many.read_until(lambda: all(many.over(i) for i in range(1, 6)))
    refused = {
        2: (grpc.StatusCode.NOT_FOUND, "no-such-model"),
        3: (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        4: (grpc.StatusCode.INVALID_ARGUMENT, "model"),
        5: (grpc.StatusCode.INVALID_ARGUMENT, "input"),
    }
    for i, (code, names) in refused.items():
        accepted, error = many.events[i]
        assert accepted.accepted
        assert error.error.code == code.value[0], error
        assert names in error.error.message, error
    assert many.events[1][-1].response.finish_reason
    assert many.text(1)
    many.call.cancel()


async def test_cancelling_an_id_stops_its_generation_and_frees_its_slot(
    shared_stub: pb_grpc.NeuronStub, shared_neuron: NeuronProcess
) -> None:
    # One slot: were the cancelled generation still running, the next would wait behind it.
    spec = demo_spec("many-slot", max_batch_size=1)
    await shared_stub.LoadModel(pb.LoadModelRequest(spec=spec))
    many = Many(shared_stub)
    await many.start({7: endless("many-slot")})
    await many.read_until(lambda: many.responded(7))
    await many.cancel(7)
    await many.start({8: chat("many-slot", QUESTION, max_tokens=16, temperature=0)})
    await many.read_until(lambda: many.over(8))
    assert "Paris" in many.text(8)
    assert not many.over(7), "a cancelled generation sends no last event"
    metrics = shared_neuron.metrics()
    cancelled = metric_value(
        metrics, "helexa_neuron_requests_total", model="many-slot", finish_reason="cancelled"
    )
    assert cancelled == 1
    generated = metric_value(metrics, "helexa_neuron_generation_tokens_total", model="many-slot")
    assert generated < 200, f"the cancelled generation went on ({generated} tokens)"
    many.call.cancel()
    await shared_stub.UnloadModel(pb.UnloadModelRequest(id="many-slot"))


async def test_an_id_reused_while_running_ends_the_call_and_its_generations(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    many = Many(shared_stub)
    await many.start({1: endless()})
    await many.read_until(lambda: many.responded(1))
    await many.start({1: chat(DEMO_ID, QUESTION, max_tokens=4)})
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await many.read_until(lambda: False)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id 1 is already running" in (ended.value.details() or "")
    deadline = time.monotonic() + 30
    while True:  # the running generation went with the call
        (model,) = [
            m for m in (await shared_stub.ListModels(pb.ListModelsRequest())).models
            if m.id == DEMO_ID
        ]  # fmt: skip
        if model.in_flight == 0:
            break
        assert time.monotonic() < deadline, model
        await asyncio.sleep(0.05)
