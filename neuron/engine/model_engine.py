"""One loaded model's engine: the asyncio bridge, and the step its device thread runs.

The asyncio side talks to it only through ``stream`` (an async iterator of ``Chunk``), which
hands a ``Sequence`` to the scheduler and receives chunks back on its own loop. Cancelling
the iterator cancels the sequence; the device thread drops it before its next step. The
device thread calls ``step``: schedule → run → sample → output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import torch

from neuron import metrics
from neuron.engine import tools
from neuron.engine.blocks import needed, pool_blocks
from neuron.engine.draft import Backoff, PromptLookup, draftable
from neuron.engine.grammar import Grammars
from neuron.engine.output import Chunk, Output
from neuron.engine.runner import Runner
from neuron.engine.sampler import Sampled, Sampler
from neuron.engine.scheduler import Scheduler
from neuron.engine.sequence import CANCELLED, ERROR, EXPIRED, SamplingParams, Sequence
from neuron.errors import InvalidArgument, QueueTimeout, ShuttingDown
from neuron.model.forward import Forward

if TYPE_CHECKING:
    from neuron.engine.worker import DeviceWorker

log = logging.getLogger(__name__)


class ModelEngine:
    """Runs one loaded model: its scheduler, its batch on the device, its outputs."""

    def __init__(
        self,
        model_id: str,
        model: Any,
        forward: Forward,
        tokenizer: Any,
        device: torch.device,
        max_batch_size: int,
        max_context: int,
        max_waiting: int,
        prefix_cache: int = 0,
        kv_cache_tokens: int = 0,
        batch_window: float = 0.0,
        speculative_tokens: int = 0,
        speculative_max_rows: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.device = device
        self.max_context = max_context
        self.eos_ids = _eos_ids(model, tokenizer)
        self._longest_token = _longest_token(tokenizer)
        self.scheduler = Scheduler(model_id, max_batch_size, max_waiting, batch_window)
        pad = self.eos_ids[0] if self.eos_ids else 0
        blocks = pool_blocks(kv_cache_tokens, max_batch_size, max_context)
        self.runner = Runner(model_id, forward, device, pad, blocks, prefix_cache)
        self.sampler = Sampler(model_id)
        self.output = Output(tokenizer, self.eos_ids, max_context)
        self.vocab_size = forward.vocab_size
        # Draft tokens a row may verify per step (prompt lookup, see ``draft``); 0: none.
        self.speculative_tokens = speculative_tokens
        # Rows a batch may have for a step to verify drafts (None: any). Every row of a
        # verifying step runs 1 + the longest draft's columns, drafted or not: at one row a
        # step is bound by memory and the columns come nearly free; with more rows on a CPU
        # the wider step costs more than chat's few kept drafts gain (BENCHMARKS.md 8).
        self.speculative_max_rows = speculative_max_rows
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self.worker: DeviceWorker | None = None
        self.last_used = 0.0
        self._labels = {"model": model_id}
        # Counted from zero for every loaded model, so their series exist before anything
        # happens (a rate of none is 0, not missing).
        for counter in (metrics.PREEMPTIONS, metrics.DRAFT_TOKENS, metrics.ACCEPTED_TOKENS):
            counter.labels(**self._labels)

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def max_waiting(self) -> int:
        return self.scheduler.max_waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self) -> Any:
        return self.scheduler.waiting

    def attached(self, worker: DeviceWorker | None) -> None:
        """The device thread that runs this engine from now on (None: detached)."""
        self.worker = worker
        self.runner.threads = worker.threads if worker is not None else contextlib.nullcontext

    # ---- asyncio side ----

    def encode_chat(
        self, messages: list[dict[str, Any]], offered: list[tools.Tool] | None = None
    ) -> list[int]:
        """Render messages (and the tools ``offered``) with the tokenizer's own chat template
        and tokenise them; see ``tools`` for templates that do not take tools."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; send a raw prompt instead")
        native = tools.template_takes_tools(self.tokenizer)
        extra = {"tools": [t.openai() for t in offered]} if native and offered else {}
        text = self.tokenizer.apply_chat_template(
            tools.prepare_messages(messages, offered or [], native),
            add_generation_prompt=True,
            tokenize=False,
            **extra,
        )
        return self._encode(text, special_tokens=False)

    def grammars(self) -> Grammars:
        """The model's grammar compiler, made on first use (call off the event loop)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(
                    self.model_id, self.tokenizer, self.vocab_size, self.eos_ids
                )
            return self._grammars

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._encode(prompt, special_tokens=True)

    def encode_continuation(self, text: str) -> list[int]:
        """The tokens of an answer's beginning, to follow its prompt's tokens as the model's
        own would (tokenised alone, so the prompt's tokens stay as they were)."""
        return self._encode(text, special_tokens=False)

    def _encode(self, text: str, special_tokens: bool) -> list[int]:
        # No token holds more characters than the longest one, so a text longer than the
        # context's worth of those cannot fit: refused before any of it is tokenised.
        if len(text) > self.max_context * self._longest_token:
            raise InvalidArgument(
                "input",
                f"the prompt is {len(text)} characters, more than the model's context of "
                f"{self.max_context} tokens can hold",
            )
        return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str = "",
        queue_timeout: float = 0.0,
        message_interval: float = 0.0,
    ) -> AsyncGenerator[Chunk, None]:
        """Generate for one request; chunks that arrive while the caller is busy are merged.

        With ``queue_timeout`` (seconds, 0: none), a request still waiting for a batch slot
        after that long is withdrawn and ``QueueTimeout`` is raised before any chunk. With
        ``message_interval`` (seconds, 0: a stream), chunks are held and merged: at most one
        per interval, and the last at once (for a caller that wants the answer whole).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk] = asyncio.Queue()
        seq = Sequence(request_id or uuid.uuid4().hex, prompt_ids, params, queue.put_nowait, loop)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.grammar is not None:
            assert self._grammars is not None
            seq.matcher = self._grammars.matcher(params.grammar)
            metrics.CONSTRAINED.labels(model=self.model_id, kind=params.constraint).inc()
        if params.tool_calls:
            seq.reader = tools.CallReader()
        self._submit(seq)
        try:
            if queue_timeout > 0:
                chunk = await self._first_chunk(seq, queue, queue_timeout)
            else:
                chunk = await queue.get()
            hold_until = seq.arrived_at + message_interval
            while True:
                while chunk.finish_reason is None and not queue.empty():
                    chunk = chunk.then(queue.get_nowait())
                if message_interval > 0 and chunk.finish_reason is None:
                    chunk = await _held(chunk, queue, hold_until)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                hold_until = time.monotonic() + message_interval
                chunk = await queue.get()
        finally:
            if not seq.finished:
                seq.cancelled = True
                self._wake()

    async def _first_chunk(
        self, seq: Sequence, queue: asyncio.Queue[Chunk], queue_timeout: float
    ) -> Chunk:
        try:
            return await asyncio.wait_for(queue.get(), queue_timeout)
        except TimeoutError:
            if not self.scheduler.withdraw(seq):
                return await queue.get()  # admitted meanwhile: it is generating now
            self._finish(seq, EXPIRED)
        raise QueueTimeout(
            f"model {self.model_id}: waited {queue_timeout:g} s for a batch slot (queue_timeout)"
        )

    def _submit(self, seq: Sequence) -> None:
        if self.worker is None:
            raise ShuttingDown(f"model {self.model_id} is not running")
        self.scheduler.submit(seq)
        self.last_used = time.time()
        self._wake()

    def _wake(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.wake()

    def abort_all(self) -> None:
        """End every unfinished sequence with finish reason ``cancelled`` (drain past its bound)."""
        self.scheduler.abort_all()
        self._wake()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or running (call from a thread, not the loop)."""
        return self.scheduler.wait_idle(timeout)

    # ---- device thread ----

    def release(self) -> None:
        """Drop every reference to the model's tensors (called on the device thread)."""
        self.runner.release()
        self.tokenizer = self.output.tokenizer = None

    def due(self) -> float:
        """When ``step`` next has work (``time.monotonic``); see ``Scheduler.due``."""
        return self.scheduler.due()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: schedule → run → sample → output.

        A failure costs only the request that caused it: prompts that fail together are
        split until the one that fails alone is found; a decode step that fails is rebuilt
        row by row (each sequence's prompt and tokens run alone), and the rows that fail alone
        end with an error while the others go on. A row whose sampling or output fails ends
        alone too.
        """
        try:
            plan = self.scheduler.schedule(self._admits())
            for seq in plan.dropped:
                self._finish(seq, CANCELLED)
            if plan.leaving:
                for i in plan.leaving:
                    self._finish(self.running[i], CANCELLED)
                gone = set(plan.leaving)
                self._keep([i for i in range(len(self.running)) if i not in gone])
            if plan.joining:
                self._prefill(plan.joining)
                self.output.flush()  # first tokens go out now, not after the decode step
            if self.running:
                self._decode()
        except Exception as e:  # a bug of the engine's own: it must not kill the worker
            log.exception("generation step failed model=%s", self.model_id)
            for seq in self.running:
                self._finish(seq, ERROR, error=f"generation failed: {e}")
            self.scheduler.running = []
            self.runner.reset()
        finally:
            self.output.flush()
            self.scheduler.update_gauges()

    def _admits(self) -> Callable[[Sequence], bool]:
        """Whether a waiting sequence may join the batch now: the KV cache has blocks for
        its tokens and the next, beside a block of room for every row already running or
        joining (so that the next steps do not preempt at once). Into an empty batch any
        sequence fits: the cache holds at least one row at the whole context."""
        free = self.runner.blocks.available - len(self.running)
        alone = not self.running  # the first to join an empty batch is never kept waiting

        def admits(seq: Sequence) -> bool:
            nonlocal free, alone
            cost = needed(len(seq.prompt_ids) + len(seq.generated) + 1)
            if cost > free and not alone:
                return False
            free, alone = free - cost - 1, False
            return True

        return admits

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill ``seqs`` into the batch; on failure, halves, down to the one that fails."""
        try:
            logits = self.runner.prefill(seqs)
        except Exception as e:
            if len(seqs) > 1:
                half = len(seqs) // 2
                self._prefill(seqs[:half])
                self._prefill(seqs[half:])
                return
            log.exception(
                "prefill failed model=%s request_id=%s", self.model_id, seqs[0].request_id
            )
            self._finish(seqs[0], ERROR, error=f"generation failed: {e}")
            return
        first_row = len(self.running)
        self.running.extend(seqs)
        self._advance(first_row, self._sample(logits, seqs, []))

    def _decode(self) -> None:
        drafts = self._drafts()
        if drafts and self.runner.room([1 + len(d) for d in drafts]) > self.runner.blocks.available:
            drafts = []  # no room for them: a plain step
        self._make_room()
        try:
            logits = self.runner.verify(drafts) if drafts else self.runner.decode()
        except Exception:
            log.exception("decode step failed model=%s: rebuilding the batch", self.model_id)
            rows = list(self.running)
            self.scheduler.running = []
            self.runner.reset()
            for seq in rows:  # alone, so a row that fails is the one that fails
                self._prefill([seq])
            return
        sampled = self._sample(logits, self.running, drafts)
        if drafts:
            kept = [len(a) for a in sampled.accepted]
            self.runner.settle(kept)
            metrics.DRAFT_TOKENS.labels(**self._labels).inc(sum(len(d) for d in drafts))
            metrics.ACCEPTED_TOKENS.labels(**self._labels).inc(sum(kept))
            for seq, draft, n in zip(self.running, drafts, kept, strict=True):
                if draft and seq.backoff is not None:
                    seq.backoff.record(len(draft), n)
        self._advance(0, sampled)

    def _make_room(self) -> None:
        """Preempt the newest rows until the KV cache has a block for every row's next token:
        each goes back to the front of the queue with what it has generated, to be run again
        (its tokens through the prefix cache where it still holds them) when there is room."""
        while len(self.running) > 1 and (
            self.runner.room([1] * len(self.running)) > self.runner.blocks.available
        ):
            row = len(self.running) - 1
            seq = self.running[row]
            log.info(
                "request preempted model=%s request_id=%s tokens=%d running=%d",
                self.model_id, seq.request_id, len(seq.prompt_ids) + len(seq.generated), row,
            )  # fmt: skip
            self._keep(list(range(row)))
            self.scheduler.requeue(seq)
            metrics.PREEMPTIONS.labels(**self._labels).inc()

    def _drafts(self) -> list[list[int]]:
        """Each running row's draft tokens for this step (prompt lookup), or [] when no row
        has any (a plain decode step). A draft never runs past what the row may still
        generate (max_tokens, the context). None in a batch over ``speculative_max_rows``,
        and none from a row whose recent drafts failed (``draft.Backoff``)."""
        if not self.speculative_tokens:
            return []
        if self.speculative_max_rows is not None and len(self.running) > self.speculative_max_rows:
            return []
        drafts: list[list[int]] = []
        for seq in self.running:
            room = min(
                seq.params.max_tokens - len(seq.generated),
                self.max_context - len(seq.prompt_ids) - len(seq.generated),
            )
            if room < 2 or not draftable(seq):
                drafts.append([])
                continue
            if seq.lookup is None or seq.backoff is None:
                seq.lookup, seq.backoff = PromptLookup(), Backoff()
            if not seq.backoff.ready():
                drafts.append([])
                continue
            k = min(self.speculative_tokens, room - 1)
            drafts.append(seq.lookup.propose(seq.prompt_ids + seq.generated, k))
        return drafts if any(drafts) else []

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]
    ) -> Sampled:
        """Sample every row (verify its draft, where it has one); if that fails, row by row,
        marking the rows that fail alone."""

        def pick(rows: slice) -> Sampled:
            if drafts:
                return self.sampler.verify(logits[rows], seqs[rows], drafts[rows])
            return self.sampler.sample(logits[rows], seqs[rows])

        try:
            return pick(slice(None))
        except Exception:
            if len(seqs) == 1:
                raise
        tokens, logprobs, accepted, failed = [], [], [], {}
        for i, seq in enumerate(seqs):
            try:
                one = pick(slice(i, i + 1))
                tokens.append(int(one.tokens[0]))
                logprobs.append(one.logprobs[0])
                accepted.append(one.accepted[0] if one.accepted else [])
            except Exception as e:
                log.exception(
                    "sampling failed model=%s request_id=%s", self.model_id, seq.request_id
                )
                tokens.append(0)
                logprobs.append(None)
                accepted.append([])
                failed[i] = f"sampling failed: {e}"
        return Sampled(torch.tensor(tokens, device=logits.device), logprobs, failed, accepted)

    def _advance(self, first_row: int, sampled: Sampled) -> None:
        """Account the new tokens of rows ``first_row``... (a row's kept draft tokens, then
        its new token), send text, let finished rows leave. A row that finishes inside its
        run (a stop, its last token) takes none of the run's later tokens."""
        tokens = sampled.tokens
        self.runner.accept(first_row, tokens)
        now = time.monotonic()
        keep = list(range(first_row))
        rows = self.running[first_row:]
        labels = self._labels
        accepted = sampled.accepted or [[] for _ in rows]
        pairs = zip(rows, tokens.tolist(), sampled.logprobs, accepted, strict=True)
        for i, (seq, token, logprob, kept) in enumerate(pairs, first_row):
            failure = sampled.failed.get(i - first_row)
            reason = None
            run = [*kept, token]
            while failure is None and reason is None and run:
                token = run.pop(0)
                seq.generated.append(token)
                seq.unsent_tokens += 1
                # Tokens of one run arrive together: those after the first have no gap.
                if seq.first_token_at == 0.0:
                    seq.first_token_at = now
                    metrics.TIME_TO_FIRST_TOKEN.labels(**labels).observe(now - seq.arrived_at)
                else:
                    metrics.INTER_TOKEN_LATENCY.labels(**labels).observe(now - seq.last_token_at)
                seq.last_token_at = now
                metrics.GENERATION_TOKENS.labels(**labels).inc()
                try:
                    reason = self.output.advance(seq, token, logprob if not run else None)
                except Exception as e:
                    log.exception(
                        "output failed model=%s request_id=%s", self.model_id, seq.request_id
                    )
                    failure = f"detokenising failed: {e}"
            if failure is not None:
                self._finish(seq, ERROR, error=failure)
            elif reason is not None:
                self._finish(seq, reason)
            else:
                keep.append(i)
        if len(keep) < len(self.running):
            self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        self.scheduler.keep(rows)
        self.runner.keep(rows)

    def _finish(self, seq: Sequence, reason: str, error: str = "") -> None:
        if seq.finished:
            return
        seq.finished = True
        # Counted before the last chunk goes out: a client that has its answer sees it counted.
        now = time.monotonic()
        metrics.REQUESTS.labels(model=self.model_id, finish_reason=reason).inc()
        metrics.END_TO_END.labels(**self._labels).observe(now - seq.arrived_at)
        self.output.finish(seq, reason, error)
        self.scheduler.finished()
        log.debug(
            "request finished model=%s request_id=%s reason=%s prompt_tokens=%d "
            "completion_tokens=%d seconds=%.3f",
            self.model_id, seq.request_id, reason, len(seq.prompt_ids), len(seq.generated),
            now - seq.arrived_at,
        )  # fmt: skip


async def _held(chunk: Chunk, queue: asyncio.Queue[Chunk], until: float) -> Chunk:
    """Merge what comes into ``chunk`` until the last chunk, or until ``until`` (monotonic)."""
    remaining = until - time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(remaining):  # a cancelled get leaves its item queued
            while chunk.finish_reason is None:
                chunk = chunk.then(await queue.get())
    return chunk


def _longest_token(tokenizer: Any) -> int:
    """Characters in the longest token's text (a byte-level token's text has a character
    per byte, and a character of the input is at least one byte)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(p) for p in pieces if p), default=1)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    return list(dict.fromkeys(ids))
