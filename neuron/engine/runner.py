"""The running batch as tensors, and the model run over it: prefill, decode and verify.

Each running row holds its tokens' keys and values in blocks of the model's paged pool
(``KVPool``) through its own block table: a row takes a block when its tokens fill the last
one, and lets its blocks go when it leaves (``Blocks``), so the batch holds the memory of the
tokens it has. A prefill runs new prompts together; the blocks the prefix cache knows of
their beginnings are taken, not run. A decode step runs every row's last token at its own
position; a verifying step (speculative decoding) runs each row's last token and its draft
tokens, and the row keeps as many as the sampler accepted: the rejected ones' slots are
simply written over by the next step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from neuron import metrics
from neuron.engine.blocks import Blocks, needed
from neuron.engine.sequence import Sequence
from neuron.model.forward import BLOCK, Forward, KVPool


class Runner:
    """One model's forward pass over its running batch (device thread only)."""

    def __init__(
        self,
        model_id: str,
        forward: Forward,
        device: torch.device,
        pad_id: int,
        blocks: int,
        prefix_cache: int,
    ) -> None:
        self.forward: Forward | None = forward
        self.device = device
        self.pad_id = pad_id
        self.pool = KVPool(forward, blocks)
        block_bytes = self.pool.data[:, :, :, :BLOCK].numel() * self.pool.data.element_size()
        self.block_bytes = block_bytes
        # What the prefix cache may keep that no row holds: ``prefix_cache`` bytes of blocks.
        self.blocks = Blocks(blocks, prefix_cache // block_bytes)
        # torch's threads for one forward pass (set by the device worker that runs this).
        self.threads: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
        self._labels = {"model": model_id}
        self.rows = 0
        self._seqs: list[Sequence] = []
        self._tables: list[list[int]] = []  # each row's blocks
        self._lengths: list[int] = []  # each row's tokens in the pool
        self._next_tokens: torch.Tensor | None = None  # [B] last sampled token per row

    def room(self, tokens: list[int]) -> int:
        """Blocks the rows need so that each row ``i`` can take ``tokens[i]`` more tokens,
        beyond those they hold."""
        return sum(
            max(0, needed(length + n) - len(table))
            for length, n, table in zip(self._lengths, tokens, self._tables, strict=True)
        )

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Run the prompts of ``seqs`` together (with what each has generated already: a row
        rebuilt after a failure, or after it was preempted), add them as the batch's last
        rows, and return their logits (one row each). ``accept`` then takes their sampled
        tokens. On failure nothing has changed (``OutOfBlocks`` if the pool has no room).
        """
        assert self.forward is not None
        prompts = [s.prompt_ids + s.generated for s in seqs]
        tables: list[list[int]] = []
        cached: list[int] = []  # tokens of each prompt the prefix cache holds
        try:
            for prompt in prompts:
                # At least the last token runs: its logits are the answer's next token.
                matched = self.blocks.match(prompt[:-1])
                tables.append(matched)
                cached.append(len(matched) * BLOCK)
                tables[-1] = matched + self._allocate(needed(len(prompt)) - len(matched))
            suffixes = [p[c:] for p, c in zip(prompts, cached, strict=True)]
            longest = max(len(x) for x in suffixes)
            # Left-padded to the longest suffix; padding runs at position 0 into scratch.
            ids = torch.tensor(
                [[self.pad_id] * (longest - len(x)) + x for x in suffixes], device=self.device
            )
            positions = torch.tensor(
                [[0] * (longest - len(x)) + list(range(c, c + len(x)))
                 for x, c in zip(suffixes, cached, strict=True)],
                device=self.device,
            )  # fmt: skip
            real = (
                torch.arange(longest, device=self.device)[None, :]
                >= torch.tensor([longest - len(x) for x in suffixes], device=self.device)[:, None]
            )
            table = self._table_tensor(tables)
            slots = torch.where(real, KVPool.slots(table, positions), 0)
            with self.threads():
                logits = self.forward(ids, positions, slots, table, self.pool)
        except BaseException:
            for t in tables:
                self.blocks.release(t)
            raise
        for prompt, t in zip(prompts, tables, strict=True):
            self.blocks.publish(prompt, t)
        for seq, c in zip(seqs, cached, strict=True):
            if not seq.generated:
                seq.cached_tokens = c
        metrics.PREFILL_BATCH.labels(**self._labels).observe(len(seqs))
        metrics.PROMPT_TOKENS.labels(**self._labels).inc(sum(len(p) for p in prompts))
        metrics.PREFIX_CACHE_HITS.labels(**self._labels).inc(sum(cached))
        self._seqs.extend(seqs)
        self._tables.extend(tables)
        self._lengths.extend(len(p) for p in prompts)
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        old = self._next_tokens
        self._next_tokens = tokens if old is None else torch.cat([old, tokens])
        self.rows += len(seqs)
        self._update_gauges()
        return logits

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """Run every row's last token; returns the next logits, one row each."""
        assert self._next_tokens is not None and self.forward is not None
        self._grow([1] * self.rows)
        positions = torch.tensor(self._lengths, device=self.device)[:, None]
        table = self._table_tensor(self._tables)
        slots = KVPool.slots(table, positions)
        with self.threads():
            logits = self.forward(self._next_tokens[:, None], positions, slots, table, self.pool)
        self._lengths = [n + 1 for n in self._lengths]
        return logits

    @torch.inference_mode()
    def verify(self, drafts: list[list[int]]) -> torch.Tensor:
        """Run every row's last token and then its ``drafts`` (none for some rows) in one
        step; returns the logits of every column, [rows, 1 + longest draft, vocab] (a row's
        columns past its own draft are padding). ``settle`` then says what was kept."""
        assert self._next_tokens is not None and self.forward is not None
        self._grow([1 + len(d) for d in drafts])
        width = 1 + max(len(d) for d in drafts)
        ids = torch.full((self.rows, width), self.pad_id, dtype=torch.long)
        for row, draft in enumerate(drafts):
            ids[row, 1 : 1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
        ids = ids.to(self.device)
        ids[:, 0] = self._next_tokens
        lengths = torch.tensor(self._lengths, device=self.device)
        ran = torch.tensor([1 + len(d) for d in drafts], device=self.device)
        offsets = torch.arange(width, device=self.device)
        real = offsets[None, :] < ran[:, None]
        # Padding after a shorter draft runs at its row's last real position, into scratch.
        positions = lengths[:, None] + torch.minimum(offsets[None, :], ran[:, None] - 1)
        table = self._table_tensor(self._tables)
        slots = torch.where(real, KVPool.slots(table, positions), 0)
        with self.threads():
            return self.forward(ids, positions, slots, table, self.pool, every=True)

    def settle(self, kept: list[int]) -> None:
        """After ``verify``: row ``i`` kept its first ``kept[i]`` draft tokens (and the token
        it ran them after)."""
        self._lengths = [n + 1 + k for n, k in zip(self._lengths, kept, strict=True)]

    def _grow(self, tokens: list[int]) -> None:
        """Give each row the blocks for ``tokens[i]`` more tokens (the engine has made room:
        see ``room``)."""
        for table, length, n in zip(self._tables, self._lengths, tokens, strict=True):
            more = needed(length + n) - len(table)
            if more > 0:
                table.extend(self._allocate(more))
        self._update_gauges()

    def _allocate(self, n: int) -> list[int]:
        """``n`` blocks, zeroed: the columns of a row's last block past its length are read
        (masked out), and what a block held before, or a fresh one's memory, must be finite
        for the mask to leave nothing of it (0 x NaN is NaN)."""
        blocks = self.blocks.allocate(n)
        if blocks:
            index = torch.tensor(blocks, device=self.device)
            slots = (index[:, None] * BLOCK + torch.arange(BLOCK, device=self.device)).flatten()
            self.pool.data.index_fill_(3, slots, 0)
        return blocks

    def _table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        """The block tables as one tensor, each padded with block 0 (scratch) to the longest."""
        width = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], device=self.device)

    def accept(self, first_row: int, tokens: torch.Tensor) -> None:
        """The tokens sampled for rows ``first_row``..., to run in the next decode step."""
        assert self._next_tokens is not None
        self._next_tokens[first_row : first_row + len(tokens)] = tokens

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``, in that order; the others let their blocks go (what
        they ran stays cached for prompts that begin with it)."""
        kept = set(keep)
        for row in range(self.rows):
            if row not in kept:
                self._let_go(row)
        if not keep:
            self._clear_rows()
            return
        assert self._next_tokens is not None
        self._seqs = [self._seqs[i] for i in keep]
        self._tables = [self._tables[i] for i in keep]
        self._lengths = [self._lengths[i] for i in keep]
        self._next_tokens = self._next_tokens.index_select(
            0, torch.tensor(keep, device=self.device)
        )
        self.rows = len(keep)
        self._update_gauges()

    def reset(self) -> None:
        """Drop the batch (a failed step: what it ran is not cached)."""
        for table in self._tables:
            self.blocks.release(table)
        self._clear_rows()

    def release(self) -> None:
        """Drop every reference to the model's tensors."""
        self.reset()
        self.blocks.clear()
        self.forward = None
        self.pool.data = torch.empty(0)
        self._update_gauges()

    def _let_go(self, row: int) -> None:
        seq, table = self._seqs[row], self._tables[row]
        self.blocks.publish((seq.prompt_ids + seq.generated)[: self._lengths[row]], table)
        self.blocks.release(table)

    def _clear_rows(self) -> None:
        self.rows = 0
        self._seqs, self._tables, self._lengths = [], [], []
        self._next_tokens = None
        self._update_gauges()

    def _update_gauges(self) -> None:
        usable = self.blocks.count - 1
        metrics.KV_CACHE_USAGE.labels(**self._labels).set(self.blocks.held / usable)
        metrics.PREFIX_CACHE_BYTES.labels(**self._labels).set(self.blocks.cached * self.block_bytes)
