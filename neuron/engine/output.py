"""From sampled tokens to what clients receive: detokenising, stop strings and chunks.

Each sequence's new token is decoded incrementally (a small window, so characters made of
several tokens come out whole), stop strings are looked for in the new text only, and text
that could still become a stop string is held back. A step's chunks go to their event loops
together (``flush``): one wake-up per loop per step, not one per chunk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from neuron.engine.sequence import ERROR, LENGTH, STOP, Sequence


@dataclass
class Chunk:
    """What a sequence produced since its last chunk; the last one has a finish reason."""

    text: str
    tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""

    def then(self, later: Chunk) -> Chunk:
        """This chunk and ``later`` as one."""
        return Chunk(
            self.text + later.text,
            self.tokens + later.tokens,
            later.finish_reason,
            later.prompt_tokens,
            later.completion_tokens,
            later.error,
        )


class Output:
    """Turns one model's tokens into chunks and hands them to the event loops."""

    def __init__(self, tokenizer: Any, eos_ids: list[int], max_context: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_context = max_context
        self._outbox: list[tuple[Sequence, Chunk]] = []  # this step's chunks, see flush

    def advance(self, seq: Sequence, token: int) -> str | None:
        """Take ``seq``'s new token: decode it, apply stop strings, send what is safe.
        Returns the finish reason if the sequence ends here."""
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
        safe = len(seq.text) - held_back(seq.text, stops)
        if safe > seq.emitted:
            self._send(seq, Chunk(seq.text[seq.emitted : safe], seq.unsent_tokens))
            seq.emitted, seq.unsent_tokens = safe, 0
        return None

    def finish(self, seq: Sequence, reason: str, error: str = "") -> None:
        """Send ``seq``'s last chunk: the rest of its text, the finish reason, the usage."""
        if seq.cancelled:  # a client that is gone gets nothing more
            return
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
    """Length of the longest end of ``text`` that could still grow into a stop sequence."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held
