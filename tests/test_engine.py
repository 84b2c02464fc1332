"""The engine in process, on a tiny random Llama with the demo model's tokenizer.

A device thread of its own runs the engine as the neuron does; requests go in through
``ModelEngine.stream`` on the test's event loop. What is checked: scheduling within the batch
bound, requests joining and leaving a running batch without changing anyone's answer,
cancellation and the queue bounds, stop strings, and speculative decoding (greedy answers
token for token, sampled ones in distribution).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helexa.neuron.v1 import neuron_pb2 as pb
from neuron import metrics
from neuron.engine import (
    ERROR,
    STOP,
    TOOL_CALLS,
    Chunk,
    DeviceWorker,
    ModelEngine,
    SamplingParams,
    Sequence,
    model_engine,
)
from neuron.engine.draft import FIRST_PAUSE, MAX_PAUSE, Backoff, PromptLookup
from neuron.engine.output import held_back
from neuron.engine.sampler import Sampler
from neuron.errors import InvalidArgument, QueueFull, QueueTimeout
from neuron.model.forward import Forward
from neuron.server import MAX_STOP_LENGTH, prepare
from neuron.sources import materialise_gguf
from tests.harness import DEMO_GGUF, SHARED_CACHE, until
from tests.test_forward import SIZES

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived",
    "def fib(n):",
    "Water boils at",
    "A list of fruits: apple, banana,",
    "SELECT * FROM",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Callable[[], Any], Any]:
    """A maker of the same random-weight Llama, as wide as the demo tokenizer's vocabulary
    (a new one each time: the engine's forward takes the layers out of the model it is
    built from), and that tokenizer."""
    import transformers

    folder = materialise_gguf(DEMO_GGUF, SHARED_CACHE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    config = transformers.LlamaConfig(
        **{**SIZES, "vocab_size": len(tokenizer), "max_position_embeddings": 512},
        # Wide weights: peaked logits, so float32 rounding never flips a greedy choice.
        initializer_range=0.5,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]

    def build() -> Any:
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()

    return build, tokenizer


@pytest.fixture(scope="module")
def worker() -> Iterator[DeviceWorker]:
    device_worker = DeviceWorker(torch.device("cpu"), cpu_threads=1)
    yield device_worker
    device_worker.stop()


@pytest.fixture
def make_engine(tiny: tuple[Callable[[], Any], Any], worker: DeviceWorker) -> Iterator[Any]:
    engines: list[ModelEngine] = []

    def make(
        max_batch_size: int = 8, max_waiting: int = 16, poison: int | None = None, **extra: Any
    ) -> ModelEngine:
        build, tokenizer = tiny
        model = build()
        forward = Forward(model, {}, False)
        engine = ModelEngine(
            "tiny",
            model,
            forward if poison is None else Poisoned(forward, poison),  # type: ignore[arg-type]
            tokenizer,
            torch.device("cpu"),
            max_batch_size=max_batch_size,
            max_context=512,
            max_waiting=max_waiting,
            **extra,
        )
        worker.attach(engine)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.abort_all()
        assert engine.wait_idle(30)
        worker.detach(engine)


class Poisoned:
    """The forward pass, failing whenever the token ``poison`` is among those it runs: a
    request that breaks the model, as a bad input or a bug might."""

    def __init__(self, forward: Forward, poison: int) -> None:
        self._forward = forward
        self._poison = poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self._forward, name)

    def __call__(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if bool((ids == self._poison).any()):
            raise RuntimeError(f"token {self._poison} breaks the model")
        return self._forward(ids, *args, **kwargs)


def ids(engine: ModelEngine, prompt: str) -> list[int]:
    return engine.encode_prompt(prompt)


async def answer(engine: ModelEngine, prompt: str, **params: Any) -> tuple[str, Chunk]:
    """The whole text of one request and its last chunk."""
    params.setdefault("max_tokens", 24)
    params.setdefault("temperature", 0.0)
    texts = []
    async for chunk in engine.stream(ids(engine, prompt), SamplingParams(**params)):
        texts.append(chunk.text)
    return "".join(texts), chunk


async def first_chunk(stream: AsyncIterator[Chunk]) -> Chunk:
    return await anext(stream)


async def test_answers_in_a_changing_batch_equal_answers_alone(make_engine: Any) -> None:
    engine = make_engine()
    lengths = [24, 5, 17, 30, 9, 12]  # rows leave at different steps
    alone = [await answer(engine, p, max_tokens=n) for p, n in zip(PROMPTS, lengths, strict=True)]
    # Three start together; three more join the running batch once it has decoded a while.
    early = [
        asyncio.create_task(answer(engine, p, max_tokens=n))
        for p, n in zip(PROMPTS[:3], lengths[:3], strict=True)
    ]
    await until(lambda: engine.running, 30, "the first requests never ran")
    await asyncio.sleep(0.02)
    late = [
        asyncio.create_task(answer(engine, p, max_tokens=n))
        for p, n in zip(PROMPTS[3:], lengths[3:], strict=True)
    ]
    together = await asyncio.gather(*early, *late)
    for (text, last), (text_alone, last_alone) in zip(together, alone, strict=True):
        assert text == text_alone
        assert last.completion_tokens == last_alone.completion_tokens
        assert last.finish_reason == last_alone.finish_reason


async def test_batch_never_holds_more_than_max_batch_size(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=2)
    tasks = [asyncio.create_task(answer(engine, p, max_tokens=12)) for p in PROMPTS[:5]]
    most = 0
    while not all(t.done() for t in tasks):
        most = max(most, len(engine.running))
        await asyncio.sleep(0.0005)
    results = await asyncio.gather(*tasks)
    assert most == 2
    assert all(last.completion_tokens >= 1 for _, last in results)


async def test_a_full_kv_cache_preempts_the_newest_rows_and_every_answer_is_as_alone(
    make_engine: Any,
) -> None:
    # One context's worth of blocks (512 tokens) for eight rows of ~10 prompt tokens and 60
    # generated: the batch outgrows the cache, the newest rows wait and run again.
    engine = make_engine(kv_cache_tokens=1)
    usable = engine.runner.blocks.count - 1
    alone = [await answer(engine, p, max_tokens=LONG) for p in PROMPTS]
    preempted = counted("preemptions")
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, engine.runner.blocks.held)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    together = await asyncio.gather(
        *[answer(engine, p, max_tokens=LONG) for p in PROMPTS + PROMPTS[:2]]
    )
    watcher.cancel()
    assert counted("preemptions") > preempted
    assert most <= usable
    for (text, last), (text_alone, last_alone) in zip(together, alone + alone[:2], strict=True):
        assert text == text_alone
        assert last.completion_tokens == last_alone.completion_tokens
    # Every block is back: none held, the prompts' beginnings cached within the bound.
    assert engine.runner.blocks.held == 0


async def test_a_prompt_near_the_context_runs_in_a_kv_cache_of_one_context(
    make_engine: Any,
) -> None:
    engine = make_engine(kv_cache_tokens=1)  # one context: 512 tokens, 32 blocks
    prompt = (ids(engine, PROMPTS[1]) * 60)[:505]  # all 32 blocks, with its next tokens

    async def run() -> list[Chunk]:
        stream = engine.stream(prompt, SamplingParams(max_tokens=6, temperature=0))
        return [c async for c in stream]

    chunks = await asyncio.wait_for(run(), 60)  # never kept waiting for room that cannot come
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 6
    assert engine.runner.blocks.held == 0


async def test_cancelled_stream_leaves_the_batch_and_frees_its_slot(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1)
    stream = engine.stream(ids(engine, PROMPTS[1]), SamplingParams(max_tokens=200, temperature=0))
    await first_chunk(stream)
    assert len(engine.running) == 1
    await stream.aclose()
    assert await asyncio.to_thread(engine.wait_idle, 10)
    assert not engine.running
    # The slot is free: the next request runs at once.
    _, last = await answer(engine, PROMPTS[0], max_tokens=4)
    assert last.completion_tokens >= 1


async def test_full_queue_refuses_and_a_queue_timeout_withdraws(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1, max_waiting=1)
    holder = engine.stream(ids(engine, PROMPTS[1]), SamplingParams(max_tokens=200, temperature=0))
    await first_chunk(holder)
    params = SamplingParams(max_tokens=4, temperature=0)
    started = time.monotonic()  # before the request exists: its queue_timeout runs from later
    waiter = engine.stream(ids(engine, PROMPTS[0]), params, queue_timeout=0.3)
    waiting = asyncio.create_task(first_chunk(waiter))
    await until(lambda: engine.waiting, 30, "the second request never waited")
    with pytest.raises(QueueFull, match="max_waiting = 1"):
        await first_chunk(engine.stream(ids(engine, PROMPTS[2]), params))
    with pytest.raises(QueueTimeout, match="queue_timeout"):
        await waiting
    assert time.monotonic() - started >= 0.3  # never before its time (a slow machine only adds)
    assert not engine.waiting
    await holder.aclose()
    assert await asyncio.to_thread(engine.wait_idle, 10)


async def test_stop_string_ends_the_answer_before_it(make_engine: Any) -> None:
    engine = make_engine()
    text, _ = await answer(engine, PROMPTS[1], max_tokens=30)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {text!r}"
    cut, last = await answer(engine, PROMPTS[1], max_tokens=30, stop=(stop,))
    assert cut == text[: text.index(stop)]
    assert last.finish_reason == STOP


async def test_seeded_sampling_repeats_whatever_the_batch(make_engine: Any) -> None:
    engine = make_engine()
    params = dict(max_tokens=16, temperature=1.0, seed=7)
    alone, _ = await answer(engine, PROMPTS[0], **params)
    crowd = [
        answer(engine, p, max_tokens=16, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)
    ]
    together = await asyncio.gather(answer(engine, PROMPTS[0], **params), *crowd)
    assert together[0][0] == alone


# ---- constraints, tool calls, logprobs (requests prepared as the server prepares them) ----

UNIT_SCHEMA = {
    "type": "object",
    "properties": {
        "unit": {"enum": ["c", "f"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer"},
    },
    "required": ["unit", "ok", "n"],
    "additionalProperties": False,
}


async def run(engine: ModelEngine, request: pb.GenerateRequest) -> tuple[str, list[Chunk]]:
    request.model = "tiny"
    prompt_ids, params = await prepare(engine, request)
    chunks = [c async for c in engine.stream(prompt_ids, params)]
    return "".join(c.text for c in chunks), chunks


def user(text: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=text)])


async def test_constrained_rows_validate_and_free_rows_answer_as_alone(make_engine: Any) -> None:
    engine = make_engine()

    def free(prompt: str) -> pb.GenerateRequest:
        return pb.GenerateRequest(prompt=prompt, max_tokens=20, temperature=0)

    def constrained(seed: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            chat=user("Answer in JSON"),
            max_tokens=120,
            temperature=1,
            seed=seed,
            output=pb.OutputConstraint(json_schema=json.dumps(UNIT_SCHEMA)),
        )

    alone = [await run(engine, free(p)) for p in PROMPTS[:4]]
    together = await asyncio.gather(
        *(run(engine, constrained(seed)) for seed in range(4)),
        *(run(engine, free(p)) for p in PROMPTS[:4]),
    )
    for (text, _), (text_alone, _) in zip(together[4:], alone, strict=True):
        assert text == text_alone
    for text, chunks in together[:4]:
        jsonschema.validate(json.loads(text), UNIT_SCHEMA)
        assert chunks[-1].finish_reason == STOP


async def test_a_forced_call_is_read_back_as_a_call_whose_arguments_validate(
    make_engine: Any,
) -> None:
    engine = make_engine()
    tools = [
        pb.Tool(name="lookup", parameters=json.dumps(UNIT_SCHEMA)),
        pb.Tool(name="other", parameters=json.dumps({"type": "object"})),
    ]
    request = pb.GenerateRequest(
        chat=user("Look it up"),
        max_tokens=120,
        temperature=1,
        seed=1,
        tools=tools,
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="lookup"),
    )
    text, chunks = await run(engine, request)
    calls = [d for c in chunks for d in c.tool_calls]
    assert text == ""
    assert calls[0].name == "lookup" and calls[0].id.startswith("call_")
    assert {d.index for d in calls} == {0}
    jsonschema.validate(json.loads("".join(d.arguments for d in calls)), UNIT_SCHEMA)
    assert chunks[-1].finish_reason == TOOL_CALLS


async def test_logprobs_are_the_log_softmax_of_the_models_logits(
    make_engine: Any, tiny: tuple[Callable[[], Any], Any]
) -> None:
    engine = make_engine()
    request = pb.GenerateRequest(
        prompt=PROMPTS[1], max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    _, chunks = await run(engine, request)
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == chunks[-1].completion_tokens
    build, tokenizer = tiny
    model = build()
    prompt = engine.encode_prompt(PROMPTS[1])
    generated = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(lp.token)) for lp in logprobs]
    ids = prompt + [t[0] for t in generated]
    with torch.inference_mode():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for step, lp in enumerate(logprobs):
        row = expected[len(prompt) - 1 + step]
        token = ids[len(prompt) + step]
        assert abs(lp.logprob - float(row[token])) < 1e-3
        assert len(lp.top) == 5
        values = [v for _, v, _ in lp.top]
        assert values == sorted(values, reverse=True)
        assert abs(values[0] - float(row.max())) < 1e-3


# ---- one request's failure costs only that request ----


async def tokens_of(engine: ModelEngine, prompt_ids: list[int], n: int) -> tuple[list[int], Chunk]:
    """Greedy answer of ``prompt_ids`` as token ids (from its logprobs) and its last chunk."""
    params = SamplingParams(max_tokens=n, temperature=0, logprobs=True)
    chunks = [c async for c in engine.stream(prompt_ids, params)]
    got = [
        engine.tokenizer.convert_tokens_to_ids(engine.tokenizer.tokenize(lp.token))
        for c in chunks
        for lp in c.logprobs
    ]
    return [t[0] if t else -1 for t in got], chunks[-1]


async def test_a_prompt_that_breaks_the_model_fails_alone(make_engine: Any) -> None:
    healthy = make_engine()
    prompts = [ids(healthy, p) for p in PROMPTS[:4]]
    alone = [await answer(healthy, p, max_tokens=16) for p in PROMPTS[:4]]
    poison = 17  # a token none of these prompts or answers holds
    engine = make_engine(poison=poison)
    bad = [*prompts[2][:2], poison, *prompts[2][2:]]
    params = SamplingParams(max_tokens=16, temperature=0)

    async def run_ids(prompt_ids: list[int]) -> tuple[str, Chunk]:
        chunks = [c async for c in engine.stream(prompt_ids, params)]
        return "".join(c.text for c in chunks), chunks[-1]

    results = await asyncio.gather(*(run_ids(p) for p in [*prompts[:2], bad, *prompts[3:]]))
    assert results[2][1].finish_reason == ERROR
    assert "breaks the model" in results[2][1].error
    for i in (0, 1, 3):
        assert results[i][0] == alone[i][0]
        assert results[i][1].finish_reason == alone[i][1].finish_reason


async def test_a_token_that_breaks_a_decode_step_fails_only_its_row(make_engine: Any) -> None:
    healthy = make_engine()
    prompts = [ids(healthy, p) for p in PROMPTS[:4]]
    answers = [await tokens_of(healthy, p, 12) for p in prompts]
    # The 4th token of the first answer breaks the model; no other prompt or answer has it.
    others = {t for p in prompts[1:] for t in p} | {t for a, _ in answers[1:] for t in a}
    candidates = [t for t in answers[0][0][3:8] if t not in others and t not in prompts[0]]
    assert candidates, "pick other prompts: every token of the first answer is elsewhere"
    engine = make_engine(poison=candidates[0])
    results = await asyncio.gather(*(tokens_of(engine, p, 12) for p in prompts))
    assert results[0][1].finish_reason == ERROR
    for i in (1, 2, 3):
        assert results[i][0] == answers[i][0]
        assert results[i][1].finish_reason == answers[i][1].finish_reason


@given(st.text("ab", max_size=12), st.lists(st.text("ab", min_size=1, max_size=6), max_size=3))
def test_held_back_text_is_the_longest_end_that_begins_a_stop(text: str, stops: list[str]) -> None:
    longest = max(
        (
            n
            for s in stops
            for n in range(1, min(len(s) - 1, len(text)) + 1)
            if text.endswith(s[:n])
        ),
        default=0,
    )
    assert held_back(text, tuple(stops)) == longest


async def test_a_stop_sequence_past_the_limit_is_refused_naming_it(make_engine: Any) -> None:
    engine = make_engine()
    request = pb.GenerateRequest(prompt="Hi", stop=["ok", "x" * (MAX_STOP_LENGTH + 1)])
    with pytest.raises(InvalidArgument, match=r"stop\[1\]: .*MAX_STOP_LENGTH"):
        await run(engine, request)


async def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenising(
    make_engine: Any,
) -> None:
    engine = make_engine()
    with pytest.raises(InvalidArgument, match="characters, more than the model's context"):
        await run(engine, pb.GenerateRequest(prompt="word " * 2_000_000))
    with pytest.raises(InvalidArgument, match="characters, more than the model's context"):
        await run(engine, pb.GenerateRequest(chat=user("word " * 2_000_000)))
    # Within what the context could hold, the real count decides.
    with pytest.raises(InvalidArgument, match="tokens; the model's context is 512"):
        await run(engine, pb.GenerateRequest(prompt="word " * 600))


async def test_tokenising_never_waits_behind_the_default_thread_pool(make_engine: Any) -> None:
    # Model loads hold the default pool's threads for seconds (downloads, weights): with every
    # one of them busy, a request is still tokenised (and its grammar compiled) at once.
    engine = make_engine()
    loop = asyncio.get_running_loop()
    release = threading.Event()
    busy = [loop.run_in_executor(None, release.wait, 60) for _ in range(64)]
    try:
        request = pb.GenerateRequest(
            chat=user("Answer in JSON"),
            max_tokens=4,
            output=pb.OutputConstraint(json_schema=json.dumps(UNIT_SCHEMA)),
        )
        prepared = asyncio.ensure_future(run(engine, request))
        done, _ = await asyncio.wait({prepared}, timeout=30)
        assert done, "the request waited for the default thread pool"
        assert len(prepared.result()[1]) >= 1
    finally:
        release.set()
        await asyncio.gather(*busy)


# ---- speculative decoding (prompt lookup) ----


def recorded(engine: ModelEngine) -> dict[tuple[int, ...], list[int]]:
    """Every request's generated tokens from now on, by its prompt's tokens."""
    seen: dict[tuple[int, ...], list[int]] = {}
    advance = engine.output.advance

    def recording(seq: Sequence, token: int, logprob: Any) -> str | None:
        seen[tuple(seq.prompt_ids)] = seq.generated
        return advance(seq, token, logprob)

    engine.output.advance = recording  # type: ignore[method-assign]
    return seen


class Oracle:
    """A drafter that knows each prompt's answer (``known``) and proposes its next tokens,
    with one of them wrong every third step, and tokens past the known answer's end: so
    drafts are kept whole, cut short and rejected at once, in every batch."""

    def __init__(self, known: dict[tuple[int, ...], list[int]]) -> None:
        self.known = known
        self.calls = 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        self.calls += 1
        for prompt, answer in self.known.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                draft = [*answer[done : done + k], 11, 12, 13][:k]
                if self.calls % 3 == 0:
                    draft[len(draft) // 2] += 1
                return draft
        return []


LONG = 60


def counted(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(f"helexa_neuron_{name}_total", {"model": "tiny"}) or 0


async def test_speculative_greedy_answers_equal_plain_ones_in_a_changing_batch(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = make_engine()
    known = recorded(plain)
    for prompt in PROMPTS:
        await answer(plain, prompt, max_tokens=LONG)
    # Ends inside an accepted run: a stop string in the middle, max_tokens, or neither.
    cases: list[tuple[str, dict[str, Any]]] = []
    for i, prompt in enumerate(PROMPTS):
        text, _ = await answer(plain, prompt, max_tokens=LONG)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip(), f"pick another prompt: {text!r}"
        options: list[dict[str, Any]] = [{"stop": (stop,)}, {"max_tokens": 7 + 9 * i}, {}]
        cases.append((prompt, {"max_tokens": LONG, **options[i % 3]}))
    expected = [await answer(plain, p, **o) for p, o in cases]

    monkeypatch.setattr(model_engine, "PromptLookup", lambda: Oracle(known))
    engine = make_engine(speculative_tokens=5)
    drafted, kept = counted("speculative_draft_tokens"), counted("speculative_accepted_tokens")
    early = [asyncio.create_task(answer(engine, p, **o)) for p, o in cases[:3]]
    await until(lambda: engine.running, 30, "the first requests never ran")
    await asyncio.sleep(0.02)
    late = [asyncio.create_task(answer(engine, p, **o)) for p, o in cases[3:]]
    together = await asyncio.gather(*early, *late)
    for (text, last), (text_plain, last_plain) in zip(together, expected, strict=True):
        assert text == text_plain
        assert last.completion_tokens == last_plain.completion_tokens
        assert last.finish_reason == last_plain.finish_reason
    drafted = counted("speculative_draft_tokens") - drafted
    kept = counted("speculative_accepted_tokens") - kept
    assert 0 < kept < drafted


def test_prompt_lookup_continues_the_most_recent_longest_match() -> None:
    lookup = PromptLookup()
    # [7, 8] stood twice before the end: the later one's continuation, up to k tokens.
    assert lookup.propose([7, 8, 1, 2, 7, 8, 3, 4, 5, 6, 7, 8], 3) == [3, 4, 5]
    # As tokens arrive: [5, 6, 9] is new, but [6, 9] stood at the start.
    assert PromptLookup().propose([6, 9, 4, 5, 6, 9], 2) == [4, 5]
    lookup = PromptLookup()
    assert lookup.propose([1, 2, 3], 4) == []
    assert lookup.propose([1, 2, 3, 1], 4) == []  # a single token is no match (min 2)
    assert lookup.propose([1, 2, 3, 1, 2], 4) == [3, 1, 2]
    assert lookup.propose([1, 2, 3, 1, 2, 3], 4) == [1, 2, 3]  # the longer match, [1, 2, 3]


async def test_prompt_lookup_drafts_from_the_prompt_and_changes_no_answer(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, engine = make_engine(), make_engine(speculative_tokens=4)
    # Prompts that hold what this model likes to say, so the lookup finds its tokens there
    # (single ones: a random model seldom says two in a row that it said before).
    monkeypatch.setattr(model_engine, "PromptLookup", lambda: PromptLookup(min_ngram=1))
    said = " ".join([(await answer(plain, p, max_tokens=30))[0] for p in PROMPTS])
    prompts = [f"{said} {p}" for p in PROMPTS]
    expected = [await answer(plain, p, max_tokens=20) for p in prompts]
    drafted = counted("speculative_draft_tokens")
    together = await asyncio.gather(*(answer(engine, p, max_tokens=20) for p in prompts))
    assert [t for t, _ in together] == [t for t, _ in expected]
    assert counted("speculative_draft_tokens") > drafted


async def test_speculative_gate_decodes_plainly_in_a_batch_over_its_bound(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = make_engine()
    known = recorded(plain)
    # Rows leave at different lengths, so the batch shrinks under the bound before the end.
    cases = [(p, 8 + 12 * i) for i, p in enumerate(PROMPTS[:4])]
    expected = [await answer(plain, p, max_tokens=n) for p, n in cases]

    monkeypatch.setattr(model_engine, "PromptLookup", lambda: Oracle(known))
    engine = make_engine(speculative_tokens=4, speculative_max_rows=2)
    rows: dict[str, list[int]] = {"verify": [], "decode": []}
    for step in rows:
        run = getattr(engine.runner, step)

        def counting(*args: Any, _run: Any = run, _step: str = step) -> Any:
            rows[_step].append(len(engine.running))
            return _run(*args)

        monkeypatch.setattr(engine.runner, step, counting)
    together = await asyncio.gather(*(answer(engine, p, max_tokens=n) for p, n in cases))
    assert [t for t, _ in together] == [t for t, _ in expected]
    assert rows["verify"] and max(rows["verify"]) <= 2, rows
    assert max(rows["decode"]) > 2, "every row had a draft: steps over the bound ran plainly"


def test_backoff_waits_longer_after_each_failure_and_a_good_draft_resets_it() -> None:
    backoff = Backoff()

    def waited() -> int:
        steps = 0
        while not backoff.ready():
            steps += 1
        return steps

    assert waited() == 0
    backoff.record(4, 0)
    assert waited() == 0, "one rejected draft is not yet a pattern"
    backoff.record(4, 0)
    assert waited() == FIRST_PAUSE
    backoff.record(4, 0)
    assert waited() == 2 * FIRST_PAUSE
    backoff.record(4, 4)  # kept whole: the next failures start from the first pause again
    backoff.record(4, 0)
    assert waited() == 0
    backoff.record(4, 0)
    assert waited() == FIRST_PAUSE
    for _ in range(10):
        backoff.record(4, 0)
        pause = waited()
    assert pause == MAX_PAUSE


class Wrong(Oracle):
    """A drafter whose every draft is wrong from its first token; records how many tokens
    the row had generated at each draft."""

    def __init__(self, known: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(known)
        self.at: list[int] = []

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for prompt, answer_ in self.known.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                self.at.append(done)
                return [t + 1 for t in answer_[done : done + k]]
        return []


async def test_speculative_row_whose_drafts_fail_backs_off_and_drafts_again_later(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = make_engine()
    known = recorded(plain)
    expected, _ = await answer(plain, PROMPTS[0], max_tokens=LONG)

    drafter = Wrong(known)
    monkeypatch.setattr(model_engine, "PromptLookup", lambda: drafter)
    engine = make_engine(speculative_tokens=4)
    text, _ = await answer(engine, PROMPTS[0], max_tokens=LONG)
    assert text == expected
    # Two rejected drafts, then waits of 4, 8, 16 steps between single tries (32 runs past
    # the answer's end): 5 drafts in 60 tokens, not 59.
    first = FIRST_PAUSE
    assert drafter.at == [1, 2, 3 + first, 4 + 3 * first, 5 + 7 * first], drafter.at


def test_speculative_sampling_draws_from_the_models_distribution() -> None:
    """The accept/reject rule on known logits: what a verifying step emits (a run of kept
    draft tokens and one token of the model's) is distributed as plain sampling would be."""
    vocab, draft = 6, [2, 4]
    probs = torch.tensor(
        [
            [0.1, 0.1, 0.4, 0.1, 0.2, 0.1],  # the first draft token is as likely as not
            [0.15, 0.05, 0.1, 0.1, 0.5, 0.1],
            [0.3, 0.2, 0.1, 0.1, 0.2, 0.1],
        ]
    )
    logits = probs.log()[None]
    seq = Sequence("x", [1], SamplingParams(max_tokens=8, temperature=1.0), print, None)  # type: ignore[arg-type]
    seq.generator = torch.Generator().manual_seed(0)
    # The exact law of a run: it stops at the first token that is not the draft's.
    exact: dict[tuple[int, ...], float] = {}
    for x in range(vocab):
        exact[(x,)] = float(probs[0, x]) if x != draft[0] else 0.0
        exact[(draft[0], x)] = float(probs[0, draft[0]] * probs[1, x]) if x != draft[1] else 0
        exact[(draft[0], draft[1], x)] = float(
            probs[0, draft[0]] * probs[1, draft[1]] * probs[2, x]
        )
    sampler, draws = Sampler("tiny"), 4000
    seen: dict[tuple[int, ...], int] = {}
    for _ in range(draws):
        out = sampler.verify(logits, [seq], [draft])
        run = (*out.accepted[0], int(out.tokens[0]))
        seen[run] = seen.get(run, 0) + 1
    distance = 0.5 * sum(abs(seen.get(r, 0) / draws - p) for r, p in exact.items())
    assert set(seen) <= set(exact)
    # Sampling noise at 4000 draws stays under 0.04 (99.9%); wrong rules measured 0.08-0.34.
    assert distance < 0.05, f"total variation {distance:.3f} from the model's distribution"


async def test_speculative_sampled_answers_start_as_the_model_says(
    make_engine: Any, tiny: tuple[Callable[[], Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine: the first three tokens of many seeded sampled answers, drafted
    (the greedy answer: often right, sometimes not), follow the model's own law."""
    plain = make_engine()
    known = recorded(plain)
    prompt = PROMPTS[1]
    await answer(plain, prompt, max_tokens=8)
    temperature, top_k = 1.5, 2
    # The exact law of the first three tokens, from the model itself.
    build, tokenizer = tiny
    model = build()
    exact: dict[str, float] = {}

    def walk(tokens: list[int], chance: float, depth: int) -> None:
        if depth == 3:
            text = tokenizer.decode(tokens[len(start) :], skip_special_tokens=True)
            exact[text] = exact.get(text, 0.0) + chance
            return
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
        top = torch.topk(logits / temperature, top_k)
        chances = torch.softmax(top.values, -1).tolist()
        for token, p in zip(top.indices.tolist(), chances, strict=True):
            walk([*tokens, token], chance * p, depth + 1)

    start = ids(plain, prompt)
    walk(start, 1.0, 0)

    monkeypatch.setattr(model_engine, "PromptLookup", lambda: Oracle(known))
    engine = make_engine(max_batch_size=16, max_waiting=1024, speculative_tokens=2)
    kept, drafted = counted("speculative_accepted_tokens"), counted("speculative_draft_tokens")
    draws = 800
    sampling = dict(max_tokens=3, temperature=temperature, top_k=top_k)
    texts = await asyncio.gather(
        *(answer(engine, prompt, seed=s, **sampling) for s in range(draws))
    )
    kept = counted("speculative_accepted_tokens") - kept
    assert 0 < kept < counted("speculative_draft_tokens") - drafted
    seen: dict[str, int] = {}
    for text, _ in texts:
        seen[text] = seen.get(text, 0) + 1
    assert set(seen) <= set(exact)
    distance = 0.5 * sum(abs(seen.get(a, 0) / draws - p) for a, p in exact.items())
    # Sampling noise at 800 draws stays under 0.06 (99.9%); a wrong rule measured 0.19.
    assert distance < 0.08, f"total variation {distance:.3f}: {seen} vs {exact}"
