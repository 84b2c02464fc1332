"""From sampled tokens to what clients receive: detokenising, stop strings and chunks.

Each sequence's new token is decoded incrementally (a small window, so characters made of
several tokens come out whole), stop strings are looked for in the new text only, and text
that could still become a stop string is held back. A step's chunks go to their event loops
together (``flush``): one wake-up per loop per step, not one per chunk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from neuron.engine.sampler import Logprob
from neuron.engine.sequence import ERROR, LENGTH, STOP, TOOL_CALLS, Sequence
from neuron.engine.tools import CallDelta


@dataclass
class TokenLogprob:
    """A token as clients see it (text and bytes), its log probability and its step's top."""

    token: str
    logprob: float
    raw: bytes  # its UTF-8 bytes
    top: list[tuple[str, float, bytes]] = field(default_factory=list)


@dataclass
class Chunk:
    """What a sequence produced since its last chunk; the last one has a finish reason."""

    text: str
    tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    tool_calls: list[CallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0
    stop_sequence: str = ""  # the last chunk: the stop string that ended the sequence

    def then(self, later: Chunk) -> Chunk:
        """This chunk and ``later`` as one."""
        return Chunk(
            self.text + later.text,
            self.tokens + later.tokens,
            later.finish_reason,
            later.prompt_tokens,
            later.completion_tokens,
            later.error,
            _merge_calls(self.tool_calls, later.tool_calls),
            self.logprobs + later.logprobs,
            later.cached_tokens,
            later.stop_sequence,
        )


def _merge_calls(a: list[CallDelta], b: list[CallDelta]) -> list[CallDelta]:
    """Pieces of the same call that follow each other become one piece."""
    merged = [CallDelta(d.index, d.id, d.name, d.arguments) for d in a]
    for d in b:
        if merged and merged[-1].index == d.index and not d.id:
            merged[-1].arguments += d.arguments
        else:
            merged.append(CallDelta(d.index, d.id, d.name, d.arguments))
    return merged


class Output:
    """Turns one model's tokens into chunks and hands them to the event loops."""

    def __init__(self, tokenizer: Any, eos_ids: list[int], max_context: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context
        self._outbox: list[tuple[Sequence, Chunk]] = []  # this step's chunks, see flush

    def advance(self, seq: Sequence, token: int, logprob: Logprob | None) -> str | None:
        """Take ``seq``'s new token: decode it, apply stop strings, send what is safe.
        Returns the finish reason if the sequence ends here."""
        if logprob is not None:
            seq.unsent_logprobs.append(self._describe(logprob))
        if token in self.eos_ids:
            return STOP
        new_text = self._detokenize(seq)
        seq.text += new_text
        stops = seq.params.stop
        if stops and new_text:
            window = max(len(s) for s in stops) + len(new_text)
            start = max(0, len(seq.text) - window)
            hits = [(p, s) for p, s in ((seq.text.find(s, start), s) for s in stops) if p >= 0]
            if hits:
                at, seq.stop_sequence = min(hits)
                seq.text = seq.text[:at]
                return STOP
        position = len(seq.prompt_ids) + len(seq.generated)
        if len(seq.generated) >= seq.params.max_tokens or position >= self.max_context:
            return LENGTH
        safe = len(seq.text) - held_back(seq.text, stops)
        if safe > seq.emitted:
            self._send(seq, self._chunk(seq, seq.text[seq.emitted : safe]))
            seq.emitted = safe
        return None

    def finish(self, seq: Sequence, reason: str, error: str = "") -> None:
        """Send ``seq``'s last chunk: the rest of its text, the finish reason, the usage."""
        if seq.cancelled:  # a client that is gone gets nothing more
            return
        if reason == ERROR:
            chunk = Chunk("", seq.unsent_tokens)
        else:
            chunk = self._chunk(seq, seq.text[seq.emitted :], final=True)
            if reason == STOP and seq.reader is not None and seq.reader.calls:
                reason = TOOL_CALLS
        chunk.finish_reason, chunk.error = reason, error
        chunk.prompt_tokens, chunk.completion_tokens = len(seq.prompt_ids), len(seq.generated)
        chunk.cached_tokens = seq.cached_tokens
        chunk.stop_sequence = seq.stop_sequence
        self._send(seq, chunk)

    def _chunk(self, seq: Sequence, text: str, final: bool = False) -> Chunk:
        """The next chunk of ``seq`` with ``text``: its content and tool calls, and the
        tokens and log probabilities not sent yet."""
        calls: list[CallDelta] = []
        if seq.reader is not None:
            text, calls = seq.reader.feed(text, final)
        chunk = Chunk(text, seq.unsent_tokens, tool_calls=calls, logprobs=seq.unsent_logprobs)
        chunk.prompt_tokens, chunk.cached_tokens = len(seq.prompt_ids), seq.cached_tokens
        seq.unsent_tokens, seq.unsent_logprobs = 0, []
        return chunk

    def _describe(self, logprob: Logprob) -> TokenLogprob:
        token, raw = self._token(logprob.token)
        top = [(*self._token(t), lp) for t, lp in logprob.top]
        return TokenLogprob(token, logprob.logprob, raw, [(t, lp, b) for t, b, lp in top])

    def _token(self, token: int) -> tuple[str, bytes]:
        text = self.tokenizer.decode([token])
        return text, text.encode("utf-8", "surrogatepass")

    def flush(self) -> None:
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

    def _send(self, seq: Sequence, chunk: Chunk) -> None:
        self._outbox.append((seq, chunk))

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


def _deliver(items: list[tuple[Sequence, Chunk]]) -> None:
    for seq, chunk in items:
        seq.sink(chunk)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop sequence.

    Only the last ``len(stop) - 1`` characters are looked at, and only where the stop's first
    character stands there: the cost per token is bounded by the stops' (bounded) lengths,
    never by the text's.
    """
    held = 0
    for stop in stops:
        tail = text[max(0, len(text) - len(stop) + 1) :] if len(stop) > 1 else ""
        at = tail.find(stop[0])
        while at >= 0 and len(tail) - at > held:
            if stop.startswith(tail[at:]):
                held = len(tail) - at
                break
            at = tail.find(stop[0], at + 1)
    return held
