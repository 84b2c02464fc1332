"""Generation through a real neuron process over real gRPC with the real SmolLM2."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from helexa.neuron.v1 import neuron_pb2 as pb
from helexa.neuron.v1 import neuron_pb2_grpc as pb_grpc
from neuron.model.forward import BLOCK
from tests.harness import (
    DEMO_ID,
    NeuronProcess,
    chat,
    collect,
    demo_model,
    demo_spec,
    metric_value,
    neuron_config,
)

QUESTION = "What is the capital of France?"


async def test_greedy_chat_answers_paris_streamed(shared_stub: pb_grpc.NeuronStub) -> None:
    text, last, count = await collect(
        shared_stub, chat(DEMO_ID, QUESTION, max_tokens=32, temperature=0)
    )
    assert "Paris" in text
    assert count > 1, "the answer must arrive as a stream of several messages"
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.prompt_tokens > 10
    assert 0 < last.usage.completion_tokens <= 32


async def test_greedy_chat_whole_answer_is_the_streamed_text(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    first, _, _ = await collect(shared_stub, chat(DEMO_ID, QUESTION, max_tokens=32, temperature=0))
    second, _, _ = await collect(shared_stub, chat(DEMO_ID, QUESTION, max_tokens=32, temperature=0))
    assert first == second == "The capital of France is Paris."


async def test_an_answer_wanted_whole_comes_in_as_few_messages_as_the_interval_allows(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    whole = chat(DEMO_ID, QUESTION, max_tokens=32, temperature=0, message_interval=60)
    text, last, count = await collect(shared_stub, whole)
    assert (text, count) == ("The capital of France is Paris.", 1)
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.tokens == last.usage.completion_tokens > 1

    story = "Write a long story about a dragon."
    # Once first, so that both runs below reuse the same cached prompt: in bf16 a prompt run
    # whole and one continued from the prefix cache can round differently.
    await collect(shared_stub, chat(DEMO_ID, story, max_tokens=1))
    streamed, _, streamed_count = await collect(
        shared_stub, chat(DEMO_ID, story, max_tokens=48, temperature=0)
    )
    interval = 0.2
    started = time.monotonic()
    held, last, count = await collect(
        shared_stub,
        chat(DEMO_ID, story, max_tokens=48, temperature=0, message_interval=interval),
    )
    elapsed = time.monotonic() - started
    assert held == streamed and last.usage.completion_tokens == 48
    # At most one message per interval of this call's own time (the last comes at once): a
    # rate within the one call, whatever the machine's speed. (How many fewer than a stream's
    # that is depends on the speed, so the 60 s interval above shows the holding.)
    assert count <= elapsed / interval + 1, (count, elapsed)
    assert streamed_count > 1


async def test_raw_prompt_is_generated_without_template(shared_stub: pb_grpc.NeuronStub) -> None:
    request = pb.GenerateRequest(
        model=DEMO_ID, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    text, last, _ = await collect(shared_stub, request)
    assert "Paris" in text
    assert last.usage.completion_tokens <= 5


async def test_max_tokens_ends_with_length(shared_stub: pb_grpc.NeuronStub) -> None:
    request = chat(DEMO_ID, "Write a long story about a dragon.", max_tokens=7, temperature=0)
    _, last, _ = await collect(shared_stub, request)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 7


async def test_stop_sequence_cuts_the_text(shared_stub: pb_grpc.NeuronStub) -> None:
    request = chat(DEMO_ID, QUESTION, max_tokens=32, temperature=0, stop=["Paris"])
    text, last, _ = await collect(shared_stub, request)
    assert text == "The capital of France is "
    assert last.finish_reason == pb.FINISH_REASON_STOP


async def test_seeded_sampling_repeats_and_differs_by_seed(shared_stub: pb_grpc.NeuronStub) -> None:
    def req(seed: int) -> pb.GenerateRequest:
        return chat(
            DEMO_ID,
            "Tell me a story.",
            max_tokens=24,
            temperature=1.0,
            top_p=0.95,
            top_k=50,
            seed=seed,
        )

    # One after another: in bf16 a row's arithmetic depends slightly on the padding around it
    # in a batch, and sampling amplifies that (batched == alone is checked in float32). The
    # first run puts the prompt in the prefix cache, so that the compared runs reuse it alike.
    await collect(shared_stub, req(0))
    a = await collect(shared_stub, req(1))
    b = await collect(shared_stub, req(1))
    c = await collect(shared_stub, req(2))
    assert a[0] == b[0]
    assert a[0] != c[0]


async def test_eight_concurrent_streams_are_batched_not_serialised(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    # float32, so that greedy answers are the same whatever the batch around them (bf16 rounds
    # differently with the batch's shape and can flip near-ties).
    model = "smollm2-f32"
    await shared_stub.LoadModel(pb.LoadModelRequest(spec=demo_spec(model, dtype="float32")))
    questions = [
        QUESTION, "Name three colours.", "What is 2 + 2?", "Say hello.",
        "What is the largest ocean?", "Name a fruit.", "What is water made of?", "Count to five.",
    ]  # fmt: skip

    def req(q: str) -> pb.GenerateRequest:
        return chat(model, q, max_tokens=48, temperature=0)

    # Each alone first: the reference answers.
    alone = [await collect(shared_stub, req(q)) for q in questions]

    # Then together, noting the order of events: batched, every stream has its first token
    # before any has its last message; served one at a time, the first would end before the second
    # began. (An order of events, not a time: it holds however slow the machine is.)
    events: list[tuple[str, int]] = []

    async def run(i: int) -> str:
        text, tokens = "", 0
        async for reply in shared_stub.Generate(req(questions[i]), timeout=300):
            if tokens == 0 and reply.tokens > 0:
                events.append(("first", i))  # its first token, not the early usage message
            text, tokens = text + reply.text, tokens + reply.tokens
        events.append(("last", i))
        return text

    together = await asyncio.gather(*(run(i) for i in range(len(questions))))

    assert together == [a[0] for a in alone], "batched output must equal alone"
    assert "Paris" in together[0]
    firsts = [n for n, (kind, _) in enumerate(events) if kind == "first"]
    lasts = [n for n, (kind, _) in enumerate(events) if kind == "last"]
    assert len(firsts) == len(lasts) == len(questions)
    assert max(firsts) < min(lasts), events
    await shared_stub.UnloadModel(pb.UnloadModelRequest(id=model))


async def test_requests_arriving_together_are_prefilled_as_one_batch(tmp_path: Path) -> None:
    """An idle model waits ``batch_window`` for another request before it runs the prompts:
    four arriving 50 ms apart under a 0.3 s window are one prefill, a lone one is its own."""
    config = neuron_config([demo_model()])
    config["engine"]["batch_window"] = 0.3
    neuron = NeuronProcess(tmp_path, config).start()
    try:
        await neuron.wait_serving()
        async with grpc.aio.insecure_channel(neuron.endpoint) as channel:
            stub = pb_grpc.NeuronStub(channel)
            request = chat(DEMO_ID, QUESTION, max_tokens=8, temperature=0)

            async def after(seconds: float) -> str:
                await asyncio.sleep(seconds)
                return (await collect(stub, request))[0]

            answers = await asyncio.gather(*(after(0.05 * i) for i in range(4)))
            assert all(answer.startswith("The capital of France") for answer in answers)
            text = neuron.metrics()
            labels = {"model": DEMO_ID}
            assert metric_value(text, "helexa_neuron_prefill_batch_size_count", **labels) == 1
            assert metric_value(text, "helexa_neuron_prefill_batch_size_sum", **labels) == 4
            assert (await collect(stub, request))[0] == answers[0]
            text = neuron.metrics()
            assert metric_value(text, "helexa_neuron_prefill_batch_size_count", **labels) == 2
            assert metric_value(text, "helexa_neuron_prefill_batch_size_sum", **labels) == 5
    finally:
        neuron.stop()


async def test_prompts_reuse_cached_beginnings_and_answer_as_if_run_whole(
    shared_neuron: NeuronProcess, shared_stub: pb_grpc.NeuronStub, tmp_path: Path
) -> None:
    # float32 on both sides, so that greedy answers can be compared exactly: the shared
    # neuron (prefix cache on, its default) against one with engine.prefix_cache = 0.
    model = "smollm2-f32-prefix"
    config = neuron_config([demo_model(model, dtype="float32")])
    config["engine"]["prefix_cache"] = 0
    plain = NeuronProcess(tmp_path / "no-prefix-cache", config).start()
    await shared_stub.LoadModel(pb.LoadModelRequest(spec=demo_spec(model, dtype="float32")))
    first = [
        pb.ChatMessage(role="user", content=QUESTION),
        pb.ChatMessage(role="assistant", content="The capital of France is Paris."),
    ]
    follow_up = pb.GenerateRequest(
        model=model,
        chat=pb.ChatMessages(
            messages=[*first, pb.ChatMessage(role="user", content="And of Italy?")]
        ),
        max_tokens=24,
        temperature=0,
    )
    questions = [QUESTION, "Name three colours.", "What is 2 + 2?", "Say hello."]
    requests = [chat(model, q, max_tokens=24, temperature=0) for q in questions]
    try:
        await plain.wait_serving()
        async with plain.channel() as channel:
            stub = pb_grpc.NeuronStub(channel)
            expected = [(await collect(stub, r))[0] for r in [*requests, follow_up]]
        assert "Paris" in expected[0] and "Rome" in expected[-1]
        assert metric_value(plain.metrics(), "helexa_neuron_prefix_cache_hit_tokens_total") == 0

        hits = "helexa_neuron_prefix_cache_hit_tokens_total"
        before = metric_value(shared_neuron.metrics(), hits, model=model)
        alone = await collect(shared_stub, requests[0])  # its whole prompt is cached now
        together = await asyncio.gather(*(collect(shared_stub, r) for r in requests))
        again = await collect(shared_stub, follow_up)  # the conversation so far is cached
        answers = [alone[0]] + [t[0] for t in together] + [again[0]]
        assert answers == [expected[0], *expected], "reused keys and values changed an answer"
        # Whole blocks come from the cache: the template's system prompt (20+ tokens, so its
        # first block) for every prompt after the first, the repeated question's blocks (all
        # but its last token), and the first turn of the conversation for the follow-up.
        reused = metric_value(shared_neuron.metrics(), hits, model=model) - before
        assert reused >= 5 * BLOCK + (alone[1].usage.prompt_tokens - 1) // BLOCK * BLOCK
    finally:
        plain.stop()
        await shared_stub.UnloadModel(pb.UnloadModelRequest(id=model))


async def test_list_models_reports_the_default_model_ready(
    shared_stub: pb_grpc.NeuronStub,
) -> None:
    reply = await shared_stub.ListModels(pb.ListModelsRequest())
    (model,) = [m for m in reply.models if m.id == DEMO_ID]
    assert model.state == pb.MODEL_STATE_READY
    assert model.device == "cpu"
    assert model.resident_bytes > 100_000_000
    assert model.loaded_at > 0
    assert model.max_context == 8192


async def test_info_reports_the_cpu_device(shared_stub: pb_grpc.NeuronStub) -> None:
    info = await shared_stub.Info(pb.InfoRequest())
    (device,) = info.devices
    assert device.kind == pb.DEVICE_KIND_CPU and device.name == "cpu"
    assert device.total_bytes == 16 << 30
    assert 0 < device.free_bytes < device.total_bytes
    assert info.version and info.host and not info.draining


@pytest.mark.parametrize(
    ("request_", "code", "named"),
    [
        (chat("no-such-model", QUESTION), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        (chat(DEMO_ID, QUESTION, max_tokens=-5), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (chat(DEMO_ID, QUESTION, max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            pb.GenerateRequest(model=DEMO_ID, chat=pb.ChatMessages()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages",
        ),
        (pb.GenerateRequest(model=DEMO_ID), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (pb.GenerateRequest(model="", prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (chat(DEMO_ID, QUESTION, temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (chat(DEMO_ID, QUESTION, top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (chat(DEMO_ID, QUESTION, stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[0]"),
        (
            chat(DEMO_ID, QUESTION, repetition_penalty=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "repetition_penalty",
        ),
        (
            pb.GenerateRequest(
                model=DEMO_ID,
                chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="hi")]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages[0].role",
        ),
        (
            pb.GenerateRequest(model=DEMO_ID, prompt="word " * 9000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "context",
        ),
        (
            chat(DEMO_ID, QUESTION, max_tokens=8190),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens: the prompt is 37 tokens and max_tokens is 8190: together more than "
            "the model's context of 8192 tokens",
        ),
        (
            chat(DEMO_ID, QUESTION, queue_timeout=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "queue_timeout",
        ),
        (
            chat(DEMO_ID, QUESTION, message_interval=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "message_interval: must be 0 (a stream) or more seconds",
        ),
        (
            chat(DEMO_ID, QUESTION, repetition_penalty=1e-45, temperature=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "repetition_penalty: must be >= 0.01 and <= 100",
        ),
        (
            chat(DEMO_ID, QUESTION, temperature=float("inf")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
    ],
)
async def test_bad_generate_requests_get_clear_statuses_and_the_neuron_keeps_serving(
    shared_stub: pb_grpc.NeuronStub, request_: pb.GenerateRequest, code: grpc.StatusCode, named: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(shared_stub, request_)
    assert error.value.code() == code
    assert named in (error.value.details() or "")
    text, _, _ = await collect(shared_stub, chat(DEMO_ID, QUESTION, max_tokens=16, temperature=0))
    assert "Paris" in text


async def test_prompt_lookup_answers_greedy_requests_as_plain_decoding_does(
    shared_neuron: NeuronProcess, shared_stub: pb_grpc.NeuronStub
) -> None:
    # float32, so that greedy answers can be compared exactly: the same model loaded with
    # speculative decoding off and with prompt lookup.
    plain, lookup = "smollm2-f32-plain", "smollm2-f32-lookup"
    small = dict(dtype="float32", max_batch_size=4, max_context=1024)  # room for both
    await shared_stub.LoadModel(
        pb.LoadModelRequest(spec=demo_spec(plain, speculative="off", **small))
    )
    await shared_stub.LoadModel(
        pb.LoadModelRequest(
            spec=demo_spec(lookup, speculative="prompt_lookup", speculative_tokens=5, **small)
        )
    )
    passage = (
        "The keeper climbed the one hundred and twelve steps of the tower every evening, "
        "trimmed the wick, polished the glass and lit the lamp."
    )
    asks = [
        f"Repeat this text exactly, but replace 'keeper' with 'warden':\n\n{passage}",
        f"Repeat this text exactly:\n\n{passage}",
        QUESTION,
        "Name three colours.",
    ]
    try:
        answers: dict[str, list[tuple[str, int]]] = {}
        for model in (plain, lookup):
            requests = [chat(model, a, max_tokens=48, temperature=0) for a in asks]
            stopped = chat(model, asks[1], max_tokens=48, temperature=0, stop=["polished"])
            results = await asyncio.gather(*(collect(shared_stub, r) for r in requests))
            answers[model] = [(t, last.usage.completion_tokens) for t, last, _ in results]
            stopped_text, stopped_last, _ = await collect(shared_stub, stopped)
            answers[model].append((stopped_text, stopped_last.usage.completion_tokens))
        assert answers[lookup] == answers[plain]
        assert "polished" not in answers[lookup][-1][0]
        text = shared_neuron.metrics()
        drafted = metric_value(text, "helexa_neuron_speculative_draft_tokens_total", model=lookup)
        kept = metric_value(text, "helexa_neuron_speculative_accepted_tokens_total", model=lookup)
        assert 0 < kept <= drafted
        assert metric_value(text, "helexa_neuron_speculative_draft_tokens_total", model=plain) == 0
    finally:
        for model in (plain, lookup):
            await shared_stub.UnloadModel(pb.UnloadModelRequest(id=model))
