"""The blocks of a model's paged KV cache: which are free, which rows hold them, and which hold
a prompt beginning's keys and values for the next prompt that starts the same way.

The prefix cache is the blocks themselves, as vLLM's: a full block is known by a digest of
its tokens and of every token before it (keys and values at a position depend only on the
tokens up to it), so a prompt whose first blocks' digests are known takes those blocks, held
by as many rows as share them, and runs only the rest. A block no row holds any more stays
cached (``idle``) until a new allocation needs it or more than ``cache_blocks`` are idle, the
least recently used going first. Only the device worker thread touches it.
"""

from __future__ import annotations

import collections
import hashlib
from array import array

from neuron.model.forward import BLOCK


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for."""


def needed(tokens: int) -> int:
    """Blocks that hold ``tokens`` tokens."""
    return -(-tokens // BLOCK)


def pool_blocks(kv_cache_tokens: int, max_batch_size: int, max_context: int) -> int:
    """Blocks of a model's pool: ``kv_cache_tokens`` (0: every row of a full batch at the
    whole context), never fewer than one row at the whole context, and the scratch block."""
    tokens = kv_cache_tokens or max_batch_size * max_context
    return needed(max(tokens, max_context)) + 1


class Blocks:
    """``count`` blocks (block 0 is the pool's scratch, never handed out); at most
    ``cache_blocks`` kept for prompt beginnings while no row holds them (0: no prefix cache).
    """

    def __init__(self, count: int, cache_blocks: int) -> None:
        self.count = count
        self.cache_blocks = cache_blocks
        # Never used, or let go uncached: a stack, so that the blocks used last (their pages
        # already taken) are used first.
        self._free = list(range(count - 1, 0, -1))
        self._refs = [0] * count
        self._digest: list[bytes | None] = [None] * count
        self._by_digest: dict[bytes, int] = {}
        # Cached blocks no row holds, least recently used first.
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def available(self) -> int:
        """Blocks an allocation may take: the free ones and the idle cached ones."""
        return len(self._free) + len(self._idle)

    @property
    def held(self) -> int:
        """Blocks rows hold."""
        return self.count - 1 - self.available

    @property
    def cached(self) -> int:
        """Blocks that hold a known prompt beginning (held or idle)."""
        return len(self._by_digest)

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks for one row, or ``OutOfBlocks`` (and none taken)."""
        if n > self.available:
            raise OutOfBlocks(f"{n} blocks asked for, {self.available} available")
        taken = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                self._forget(block)
            self._refs[block] = 1
            taken.append(block)
        return taken

    def release(self, blocks: list[int]) -> None:
        """A row lets ``blocks`` go: those no other row holds become idle (cached) or free."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if self._digest[block] is not None:
                self._idle[block] = None
            else:
                self._free.append(block)
        while len(self._idle) > self.cache_blocks:
            block, _ = self._idle.popitem(last=False)
            self._forget(block)
            self._free.append(block)

    def match(self, tokens: list[int]) -> list[int]:
        """The cached blocks that begin ``tokens``, taken for one row (each whole block of
        it, in order, as far as they are known)."""
        taken: list[int] = []
        digest = b""
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            digest = _digest(digest, tokens[start : start + BLOCK])
            block = self._by_digest.get(digest)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            taken.append(block)
        return taken

    def publish(self, tokens: list[int], table: list[int]) -> None:
        """Make the whole blocks of ``tokens`` (held through ``table``) known to ``match``.
        A beginning already known in another block stays known there."""
        if self.cache_blocks <= 0:
            return
        digest = b""
        for i, start in enumerate(range(0, len(tokens) - BLOCK + 1, BLOCK)):
            digest = _digest(digest, tokens[start : start + BLOCK])
            block = table[i]
            if self._digest[block] is None and digest not in self._by_digest:
                self._digest[block] = digest
                self._by_digest[digest] = block

    def clear(self) -> None:
        """Forget every cached beginning (the idle blocks become free)."""
        for block in list(self._idle):
            self._forget(block)
            self._free.append(block)
        self._idle.clear()
        for digest, block in list(self._by_digest.items()):
            del self._by_digest[digest]
            self._digest[block] = None

    def _forget(self, block: int) -> None:
        digest = self._digest[block]
        if digest is not None:
            del self._by_digest[digest]
            self._digest[block] = None


def _digest(before: bytes, tokens: list[int]) -> bytes:
    """A block's name: its tokens and (through ``before``, the previous block's name) every
    token before them."""
    return hashlib.blake2b(before + array("q", tokens).tobytes(), digest_size=16).digest()
