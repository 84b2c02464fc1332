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
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import torch

from neuron import metrics
from neuron.engine import tools
from neuron.engine.grammar import Grammars
from neuron.engine.output import Chunk, Output
from neuron.engine.runner import Runner
from neuron.engine.sampler import Sampled, Sampler
from neuron.engine.scheduler import Scheduler
from neuron.engine.sequence import CANCELLED, ERROR, EXPIRED, SamplingParams, Sequence
from neuron.errors import QueueTimeout, ShuttingDown
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
        batch_window: float = 0.0,
    ) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.device = device
        self.max_context = max_context
        self.eos_ids = _eos_ids(model, tokenizer)
        self.scheduler = Scheduler(model_id, max_batch_size, max_waiting, batch_window)
        pad = self.eos_ids[0] if self.eos_ids else 0
        self.runner = Runner(model_id, forward, device, pad, prefix_cache)
        self.sampler = Sampler(model_id)
        self.output = Output(tokenizer, self.eos_ids, max_context)
        self.vocab_size = forward.vocab_size
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self.worker: DeviceWorker | None = None
        self.last_used = 0.0
        self._labels = {"model": model_id}

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
        encoded = self.tokenizer.apply_chat_template(
            tools.prepare_messages(messages, offered or [], native),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **extra,
        )
        return list(encoded["input_ids"])

    def grammars(self) -> Grammars:
        """The model's grammar compiler, made on first use (call off the event loop)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(
                    self.model_id, self.tokenizer, self.vocab_size, self.eos_ids
                )
            return self._grammars

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

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
        """One iteration: schedule → run → sample → output."""
        try:
            plan = self.scheduler.schedule()
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
                logits = self.runner.decode()
                self._advance(0, self.sampler.sample(logits, self.running))
        except Exception as e:  # a failed forward must not kill the worker or hang clients
            log.exception("generation step failed model=%s", self.model_id)
            for seq in self.running:
                self._finish(seq, ERROR, error=f"generation failed: {e}")
            self.scheduler.running = []
            self.runner.reset()
        finally:
            self.output.flush()
            self.scheduler.update_gauges()

    def _prefill(self, seqs: list[Sequence]) -> None:
        try:
            logits = self.runner.prefill(seqs)
        except Exception as e:
            # They are in neither queue yet: finish them here or their clients wait forever.
            for seq in seqs:
                self._finish(seq, ERROR, error=f"prefill failed: {e}")
            raise
        first_row = len(self.running)
        self.running.extend(seqs)
        self._advance(first_row, self.sampler.sample(logits, seqs))

    def _advance(self, first_row: int, sampled: Sampled) -> None:
        """Account the new token of rows ``first_row``..., send text, let finished rows leave."""
        tokens = sampled.tokens
        self.runner.accept(first_row, tokens)
        now = time.monotonic()
        keep = list(range(first_row))
        rows = self.running[first_row:]
        labels = self._labels
        pairs = zip(rows, tokens.tolist(), sampled.logprobs, strict=True)
        for i, (seq, token, logprob) in enumerate(pairs, first_row):
            seq.generated.append(token)
            seq.unsent_tokens += 1
            if seq.first_token_at == 0.0:
                seq.first_token_at = now
                metrics.TIME_TO_FIRST_TOKEN.labels(**labels).observe(now - seq.arrived_at)
            else:
                metrics.INTER_TOKEN_LATENCY.labels(**labels).observe(now - seq.last_token_at)
            seq.last_token_at = now
            metrics.GENERATION_TOKENS.labels(**labels).inc()
            reason = self.output.advance(seq, token, logprob)
            if reason is not None:
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


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    return list(dict.fromkeys(ids))
