"""Generation for loaded models: continuous batching on one worker thread per device.

Torch never runs on the asyncio loop. Each device has a ``DeviceWorker`` thread that owns
torch for it and runs every model placed there. A model's ``ModelEngine`` keeps a queue of
waiting sequences and one running batch whose KV cache has a row per sequence, left-padded
to a common length, with each row's own positions. New sequences are prefilled together and
merged into the batch; finished ones leave it at once; the loop is admit → decode → emit.

The asyncio side talks to it only through ``ModelEngine.stream`` (an async iterator of
``Chunk``), which hands a ``Sequence`` over to the thread and receives chunks back through
``loop.call_soon_threadsafe``. Cancelling the iterator cancels the sequence; the thread
drops it before its next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from neuron import metrics
from neuron.errors import QueueFull, QueueTimeout, ShuttingDown
from neuron.forward import Forward, KVCache
from neuron.prefix import PrefixCache

log = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
# Columns a new batch's KV cache has beyond its prompts before it first grows.
_DECODE_ROOM = 64
# How many batch windows at most an idle model waits for a burst to finish arriving.
_WINDOW_CAP = 5
# Dropped while still waiting for a batch slot (never sent to a client: the call fails).
EXPIRED = "queue_timeout"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0


@dataclass
class Chunk:
    """What a sequence produced since its last chunk; the last one has a finish reason."""

    text: str
    tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass(eq=False)
class Sequence:
    """One request's state from waiting to finished."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Takes a chunk on the asyncio loop's thread (the worker posts them there, see _flush).
    sink: Callable[[Chunk], None]
    loop: asyncio.AbstractEventLoop
    generated: list[int] = field(default_factory=list)
    text: str = ""  # decoded completion so far
    emitted: int = 0  # characters of text already sent
    unsent_tokens: int = 0  # tokens generated since the last chunk
    prefix_offset: int = 0  # incremental detokenisation window
    read_offset: int = 0
    generator: torch.Generator | None = None
    arrived_at: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    # Set from the asyncio side: the client is gone, nothing more is sent.
    cancelled: bool = False
    # Set by the neuron (drain past its bound): end with finish reason "cancelled".
    aborted: bool = False
    finished: bool = False


class ModelEngine:
    """Runs one loaded model: its waiting queue, its running batch, its generation steps."""

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
        self.forward: Forward | None = forward
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        self.max_waiting = max_waiting
        # Seconds an idle model waits for another request before it runs the prompts it has,
        # so that requests arriving together are prefilled together (see ``due``).
        self.batch_window = batch_window
        self.eos_ids = _eos_ids(model, tokenizer)
        # Keys and values of prompt beginnings, at most ``prefix_cache`` bytes (worker thread).
        self.prefixes = PrefixCache(prefix_cache)
        self.worker: DeviceWorker | None = None
        self.last_used = 0.0
        # Shared with the asyncio side, guarded by the worker's condition lock.
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.unfinished = 0
        # Owned by the worker thread.
        self.running: list[Sequence] = []
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 for real tokens, 0 for padding
        self._positions: torch.Tensor | None = None  # [B] position of each row's next token
        self._next_tokens: torch.Tensor | None = None  # [B] last sampled token per row
        self._outbox: list[tuple[Sequence, Chunk]] = []  # this step's chunks, see _flush
        self._idle = threading.Event()
        self._idle.set()
        self._metric_labels = {"model": model_id}

    # ---- asyncio side ----

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render messages with the tokenizer's own chat template and tokenise them."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; send a raw prompt instead")
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

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
        self._submit(seq)
        try:
            if queue_timeout > 0:
                chunk = await self._first_chunk(seq, queue, queue_timeout)
            else:
                chunk = await queue.get()
            hold_until = seq.arrived_at + message_interval
            while True:
                while chunk.finish_reason is None and not queue.empty():
                    chunk = _merge(chunk, queue.get_nowait())
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
                if self.worker is not None:
                    self.worker.wake()

    async def _first_chunk(
        self, seq: Sequence, queue: asyncio.Queue[Chunk], queue_timeout: float
    ) -> Chunk:
        try:
            return await asyncio.wait_for(queue.get(), queue_timeout)
        except TimeoutError:
            if not self._withdraw(seq):
                return await queue.get()  # admitted meanwhile: it is generating now
        raise QueueTimeout(
            f"model {self.model_id}: waited {queue_timeout:g} s for a batch slot (queue_timeout)"
        )

    def _withdraw(self, seq: Sequence) -> bool:
        """Take ``seq`` out of the waiting queue if it is still there (not admitted)."""
        worker = self.worker
        if worker is None:
            return False
        with worker.cond:
            if seq not in self.waiting:
                return False
            self.waiting.remove(seq)
            seq.cancelled = True  # nothing more goes to its sink
            self._finish(seq, EXPIRED)
            metrics.WAITING.labels(**self._metric_labels).set(len(self.waiting))
        return True

    def _submit(self, seq: Sequence) -> None:
        worker = self.worker
        if worker is None:
            raise ShuttingDown(f"model {self.model_id} is not running")
        with worker.cond:
            # Free batch slots count too: a burst must not be refused before the worker has
            # had a step to admit what it has room for.
            free = max(0, self.max_batch_size - len(self.running))
            if len(self.waiting) >= self.max_waiting + free:
                raise QueueFull(
                    f"model {self.model_id} has {len(self.waiting)} requests waiting for "
                    f"{free} free batch slots (the bound: max_waiting = {self.max_waiting})"
                )
            self.waiting.append(seq)
            self.unfinished += 1
            self._idle.clear()
            self.last_used = time.time()
            metrics.WAITING.labels(**self._metric_labels).set(len(self.waiting))
            worker.cond.notify()

    def abort_all(self) -> None:
        """End every unfinished sequence with finish reason ``cancelled`` (drain past its bound)."""
        worker = self.worker
        if worker is None:
            return
        with worker.cond:
            for seq in list(self.waiting) + list(self.running):
                seq.aborted = True
            worker.cond.notify()

    def release(self) -> None:
        """Drop every reference to the model's tensors (called on the device thread)."""
        self.forward = None
        self.tokenizer = None
        self.prefixes.clear()
        metrics.PREFIX_CACHE_BYTES.labels(**self._metric_labels).set(0)
        self._reset_batch()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or running (call from a thread, not the loop)."""
        return self._idle.wait(timeout)

    # ---- worker thread ----

    def due(self) -> float:
        """When ``step`` next has work (``time.monotonic``): now while a batch runs, never
        when nothing waits. With no batch running, requests that arrive together are
        prefilled together: the prompts run once none has arrived for ``batch_window``, or
        ``_WINDOW_CAP`` windows after the first (at once when they fill the batch). Without
        it a burst runs as the first prompt alone and then the rest, which wait for it.
        Call with the worker's lock held."""
        if self.running:
            return 0.0
        if not self.waiting:
            return math.inf
        if len(self.waiting) >= self.max_batch_size:
            return 0.0
        window = self.batch_window
        return min(
            self.waiting[-1].arrived_at + window, self.waiting[0].arrived_at + _WINDOW_CAP * window
        )

    def step(self) -> None:
        """One iteration: drop cancelled sequences, admit waiting ones, decode one token."""
        try:
            self._drop_cancelled()
            self._admit()
            self._flush()  # first tokens go out now, not after the decode step below
            if self.running:
                self._decode()
        except Exception as e:  # a failed forward must not kill the worker or hang clients
            log.exception("generation step failed model=%s", self.model_id)
            for seq in self.running:
                self._finish(seq, ERROR, error=f"generation failed: {e}")
            self._reset_batch()
        finally:
            self._flush()
            self._update_gauges()

    def _send(self, seq: Sequence, chunk: Chunk) -> None:
        """Queue ``chunk`` for ``seq``'s client; a step's chunks go to the loop together."""
        self._outbox.append((seq, chunk))

    def _flush(self) -> None:
        """Hand this step's chunks to their loops: one wake-up per loop, not one per chunk."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Chunk]]] = {}
        for seq, chunk in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq, chunk))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

    def _drop_cancelled(self) -> None:
        assert self.worker is not None
        with self.worker.cond:
            for seq in [s for s in self.waiting if s.cancelled or s.aborted]:
                self.waiting.remove(seq)
                self._finish(seq, CANCELLED)
        gone = [i for i, s in enumerate(self.running) if s.cancelled or s.aborted]
        for i in gone:
            self._finish(self.running[i], CANCELLED)
        if gone:
            self._keep_rows([i for i in range(len(self.running)) if i not in set(gone)])

    def _admit(self) -> None:
        assert self.worker is not None
        room = self.max_batch_size - len(self.running)
        if room <= 0:
            return
        with self.worker.cond:
            new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        if not new:
            return
        now = time.monotonic()
        for seq in new:
            metrics.QUEUE_TIME.labels(**self._metric_labels).observe(now - seq.arrived_at)
        try:
            self._prefill(new)
        except Exception as e:
            # They are in neither queue yet: finish them here or their clients wait forever.
            for seq in new:
                self._finish(seq, ERROR, error=f"prefill failed: {e}")
            raise

    @torch.inference_mode()
    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run the prompts of ``seqs`` together and merge them into the batch.

        What the prefix cache holds of a prompt's beginning is copied in, not run (one token
        is always run, for its logits). Columns ``[0, past)`` hold the cached beginnings and
        ``[past, past + longest)`` the tokens run now, each part right-aligned per row.
        """
        assert self.forward is not None
        matches = [self.prefixes.match(s.prompt_ids[:-1]) for s in seqs]
        suffixes = [s.prompt_ids[m:] for s, (m, _) in zip(seqs, matches, strict=True)]
        past = max(m for m, _ in matches)
        longest = max(len(x) for x in suffixes)
        columns = past + longest
        pad = self.eos_ids[0] if self.eos_ids else 0
        ids = torch.tensor([[pad] * (longest - len(x)) + x for x in suffixes], device=self.device)
        cache = KVCache.empty(self.forward, len(seqs), columns + _DECODE_ROOM)
        mask = torch.zeros(len(seqs), columns, dtype=torch.long, device=self.device)
        if past:
            cache.data[..., :past, :] = 0  # padding there must not be garbage (NaN * 0)
        for row, (m, pieces) in enumerate(matches):
            at = past - m
            for piece in pieces:
                cache.data[:, :, row, :, at : at + piece.shape[3]] = piece
                at += piece.shape[3]
            mask[row, past - m : past] = 1
            mask[row, columns - len(suffixes[row]) :] = 1
        cache.length = past
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        assert self.worker is not None
        with self.worker.threads():
            logits = self.forward(ids, position_ids, mask, cache)
        tokens = self._sample(logits, seqs)
        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=self.device)
        self._remember_prompts(seqs, cache, mask)
        labels = self._metric_labels
        metrics.PREFILL_BATCH.labels(**labels).observe(len(seqs))
        metrics.PROMPT_TOKENS.labels(**labels).inc(int(lengths.sum()))
        metrics.PREFIX_CACHE_HITS.labels(**labels).inc(sum(m for m, _ in matches))
        metrics.PREFIX_CACHE_BYTES.labels(**labels).set(self.prefixes.bytes)
        first_row = len(self.running)
        self._merge_batch(seqs, cache, mask, lengths, tokens)
        self._emit(first_row, tokens)

    def _remember_prompts(self, seqs: list[Sequence], cache: KVCache, mask: torch.Tensor) -> None:
        """Keep each prompt's keys and values (its row's real columns) in the prefix cache."""
        if self.prefixes.budget <= 0:
            return
        used = cache.data[..., : mask.shape[1], :]
        for row, seq in enumerate(seqs):
            self.prefixes.insert(seq.prompt_ids, used[:, :, row, :, mask[row].bool()])

    @torch.inference_mode()
    def _decode(self) -> None:
        assert self._mask is not None and self._positions is not None
        assert self._next_tokens is not None and self._cache is not None
        assert self.forward is not None
        batch = len(self.running)
        self._mask = torch.cat(
            [self._mask, torch.ones(batch, 1, dtype=self._mask.dtype, device=self.device)], dim=1
        )
        assert self.worker is not None
        with self.worker.threads():
            logits = self.forward(
                self._next_tokens[:, None], self._positions[:, None], self._mask, self._cache
            )
        self._positions = self._positions + 1
        tokens = self._sample(logits, self.running)
        self._next_tokens = tokens
        self._emit(0, tokens)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Pick one token per row: greedy where temperature is 0, else seeded sampling."""
        logits = logits.float()
        for i, seq in enumerate(seqs):
            penalty = seq.params.repetition_penalty
            if penalty != 1.0:
                seen = torch.tensor(
                    sorted(set(seq.prompt_ids + seq.generated)), device=logits.device
                )
                scores = logits[i, seen]
                logits[i, seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
        tokens = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0:
                continue
            row = logits[i] / p.temperature
            if p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                drop = probs.cumsum(-1) - probs > p.top_p
                row = row.scatter(0, order[drop], float("-inf"))
            probs = torch.softmax(row, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=seq.generator)[0]
        return tokens

    def _emit(self, first_row: int, tokens: torch.Tensor) -> None:
        """Account the new token of rows ``first_row``..., send text, let finished rows leave."""
        now = time.monotonic()
        keep = list(range(first_row))
        rows = self.running[first_row:]
        for i, (seq, token) in enumerate(zip(rows, tokens.tolist(), strict=True), first_row):
            seq.generated.append(token)
            seq.unsent_tokens += 1
            labels = self._metric_labels
            if seq.first_token_at == 0.0:
                seq.first_token_at = now
                metrics.TIME_TO_FIRST_TOKEN.labels(**labels).observe(now - seq.arrived_at)
            else:
                metrics.INTER_TOKEN_LATENCY.labels(**labels).observe(now - seq.last_token_at)
            seq.last_token_at = now
            metrics.GENERATION_TOKENS.labels(**labels).inc()
            reason = self._advance_text(seq, token)
            if reason is not None:
                self._finish(seq, reason)
            else:
                keep.append(i)
        if len(keep) < len(self.running):
            self._keep_rows(keep)

    def _advance_text(self, seq: Sequence, token: int) -> str | None:
        """Decode the new token, apply stop sequences, send what is safe; maybe finish."""
        if token in self.eos_ids:
            return STOP
        new_text = self._detokenize(seq)
        seq.text += new_text
        stops = seq.params.stop
        if stops and new_text:
            window = max(len(s) for s in stops) + len(new_text)
            start = max(0, len(seq.text) - window)
            hits = [p for p in (seq.text.find(s, start) for s in stops) if p >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                return STOP
        position = len(seq.prompt_ids) + len(seq.generated)
        if len(seq.generated) >= seq.params.max_tokens or position >= self.max_context:
            return LENGTH
        safe = len(seq.text) - _held_back(seq.text, stops)
        if safe > seq.emitted:
            self._send(seq, Chunk(seq.text[seq.emitted : safe], seq.unsent_tokens))
            seq.emitted, seq.unsent_tokens = safe, 0
        return None

    def _detokenize(self, seq: Sequence) -> str:
        # Decode a small window of tokens so multi-token characters come out whole.
        tokens = seq.generated
        prefix = self.tokenizer.decode(
            tokens[seq.prefix_offset : seq.read_offset], skip_special_tokens=True
        )
        full = self.tokenizer.decode(tokens[seq.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(tokens)
            return full[len(prefix) :]
        return ""

    def _finish(self, seq: Sequence, reason: str, error: str = "") -> None:
        if seq.finished:
            return
        seq.finished = True
        # Counted before the last chunk goes out: a client that has its answer sees it counted.
        now = time.monotonic()
        metrics.REQUESTS.labels(model=self.model_id, finish_reason=reason).inc()
        metrics.END_TO_END.labels(**self._metric_labels).observe(now - seq.arrived_at)
        if not seq.cancelled:  # a client that is gone gets nothing more
            rest = seq.text[seq.emitted :] if reason != ERROR else ""
            self._send(
                seq,
                Chunk(
                    rest,
                    seq.unsent_tokens,
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.generated),
                    error=error,
                ),
            )
        assert self.worker is not None
        with self.worker.cond:
            self.unfinished -= 1
            if self.unfinished == 0:
                self._idle.set()
        log.debug(
            "request finished model=%s request_id=%s reason=%s prompt_tokens=%d "
            "completion_tokens=%d seconds=%.3f",
            self.model_id, seq.request_id, reason, len(seq.prompt_ids), len(seq.generated),
            now - seq.arrived_at,
        )  # fmt: skip

    # ---- the batch's KV cache ----

    def _merge_batch(
        self,
        seqs: list[Sequence],
        cache: KVCache,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        if not self.running:
            self.running = list(seqs)
            self._cache, self._mask, self._positions = cache, mask, lengths
            self._next_tokens = tokens
            return
        assert self._mask is not None and self._positions is not None
        assert self._next_tokens is not None and self._cache is not None
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        total = max(old_len, new_len)
        self._cache.merge(cache)
        self._mask = torch.cat(
            [F.pad(self._mask, (total - old_len, 0)), F.pad(mask, (total - new_len, 0))]
        )
        self._positions = torch.cat([self._positions, lengths])
        self._next_tokens = torch.cat([self._next_tokens, tokens])
        self.running.extend(seqs)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` and cut the padding columns no row needs any more."""
        if not keep:
            self._reset_batch()
            return
        assert self._mask is not None and self._positions is not None
        assert self._next_tokens is not None and self._cache is not None
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        # Leading columns that are padding in every remaining row can go.
        real = mask.any(dim=0).nonzero()
        cut = int(real[0]) if real.numel() else 0
        self._cache.keep(index, cut)
        self._mask = mask[:, cut:]
        self._positions = self._positions.index_select(0, index)
        self._next_tokens = self._next_tokens.index_select(0, index)
        self.running = [self.running[i] for i in keep]

    def _reset_batch(self) -> None:
        self.running = []
        self._cache = self._mask = self._positions = self._next_tokens = None

    def _update_gauges(self) -> None:
        metrics.RUNNING.labels(**self._metric_labels).set(len(self.running))
        metrics.WAITING.labels(**self._metric_labels).set(len(self.waiting))


class DeviceWorker:
    """The thread that owns torch for one device and runs every model placed on it."""

    def __init__(self, device: torch.device, cpu_threads: int = 0) -> None:
        self.device = device
        self.cond = threading.Condition()
        self._engines: list[ModelEngine] = []
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._stopped = False
        self._cpu_threads = cpu_threads
        self._thread = threading.Thread(target=self._run, name=f"torch-{device}", daemon=True)
        self._thread.start()

    def attach(self, engine: ModelEngine) -> None:
        with self.cond:
            engine.worker = self
            self._engines.append(engine)

    def detach(self, engine: ModelEngine) -> None:
        with self.cond:
            if engine in self._engines:
                self._engines.remove(engine)
            engine.worker = None

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on this device's thread between steps (torch work that must not race)."""
        future: Future[Any] = Future()
        with self.cond:
            self._calls.append((fn, future))
            self.cond.notify()
        return future

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self._stopped = True
            self.cond.notify()
        self._thread.join(timeout=10)

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """torch's threads for one forward pass, and one between passes.

        Between passes this thread samples, detokenises and hands chunks to the event loop,
        which needs a core at that moment too: with torch left at every core, one stream
        ran at 31 tokens/s and 8 at 137-145 on 2 cores; dropping to one thread between
        passes gave 49-53 and 208-212 (the bare step is 48 and 237).
        """
        if self.device.type != "cpu":
            yield
            return
        torch.set_num_threads(self._cpu_threads or len(os.sched_getaffinity(0)))
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        while True:
            with self.cond:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    dues = [(e, e.due()) for e in self._engines]
                    due = min((d for _, d in dues), default=math.inf)
                    if self._calls or due <= now:
                        break
                    self.cond.wait(None if due == math.inf else due - now)
                calls = list(self._calls)
                self._calls.clear()
                engines = [e for e, d in dues if d <= now]
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
            for engine in engines:
                engine.step()


def _deliver(items: list[tuple[Sequence, Chunk]]) -> None:
    for seq, chunk in items:
        seq.sink(chunk)


async def _held(chunk: Chunk, queue: asyncio.Queue[Chunk], until: float) -> Chunk:
    """Merge what comes into ``chunk`` until the last chunk, or until ``until`` (monotonic)."""
    remaining = until - time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(remaining):  # a cancelled get leaves its item queued
            while chunk.finish_reason is None:
                chunk = _merge(chunk, await queue.get())
    return chunk


def _merge(a: Chunk, b: Chunk) -> Chunk:
    return Chunk(
        a.text + b.text,
        a.tokens + b.tokens,
        b.finish_reason,
        b.prompt_tokens,
        b.completion_tokens,
        b.error,
    )


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop sequence."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    return list(dict.fromkeys(ids))
