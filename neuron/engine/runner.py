"""The running batch as tensors, and the model run over it: prefill and decode.

The batch's KV cache has a row per running sequence, left-padded to a common length, with
each row's own positions and a mask of its real columns. A prefill runs new prompts together
(what the prefix cache holds of their beginnings is copied in, not run) and merges them into
the batch; a decode step runs every row's last token; rows that leave are cut out, with the
padding columns no row needs any more.

A verifying step (speculative decoding) runs each row's last token and its draft tokens
together, as new columns: a row with a shorter draft (or none) has padding columns after it.
Once the sampler has said how many draft tokens each row keeps, the columns of the ones it
rejected become padding (mask 0) and the columns no row kept are cut, so the next step
appends after the longest row's kept tokens; positions are each row's own, never read from
the mask. The holes this leaves in the rows are packed out (each row's real columns gathered
to the right end) once the cache is ``holes`` columns longer than its longest row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from neuron import metrics
from neuron.engine.sequence import Sequence
from neuron.model.forward import GROWTH, Forward, KVCache
from neuron.prefix import PrefixCache


class Runner:
    """One model's forward pass over its running batch (device thread only)."""

    def __init__(
        self, model_id: str, forward: Forward, device: torch.device, pad_id: int, prefix_cache: int
    ) -> None:
        self.forward: Forward | None = forward
        self.device = device
        self.pad_id = pad_id
        # Keys and values of prompt beginnings, at most ``prefix_cache`` bytes.
        self.prefixes = PrefixCache(prefix_cache)
        # torch's threads for one forward pass (set by the device worker that runs this).
        self.threads: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
        self._labels = {"model": model_id}
        self.rows = 0
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 for real tokens, 0 for padding
        self._positions: torch.Tensor | None = None  # [B] position of each row's next token
        self._next_tokens: torch.Tensor | None = None  # [B] last sampled token per row
        self._verifying = 0  # columns the last verifying step ran
        # Columns of holes (rejected drafts) the batch's longest row may hold before the
        # cache is packed: one copy of the cache per that many, as its growth costs.
        self.holes = GROWTH // 2

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], rerun: bool = False) -> torch.Tensor:
        """Run the prompts of ``seqs`` together, add them as the batch's last rows, and
        return their logits (one row each). ``accept`` then takes their sampled tokens.
        ``rerun``: run each sequence's prompt and every token it generated (to rebuild a
        batch that failed), so the logits are those of its next token. On failure nothing
        has changed.

        Columns ``[0, past)`` hold the cached beginnings and ``[past, past + longest)`` the
        tokens run now, each part right-aligned per row.
        """
        assert self.forward is not None
        prompts = [s.prompt_ids + s.generated if rerun else s.prompt_ids for s in seqs]
        matches = [self.prefixes.match(p[:-1]) for p in prompts]
        suffixes = [p[m:] for p, (m, _) in zip(prompts, matches, strict=True)]
        past = max(m for m, _ in matches)
        longest = max(len(x) for x in suffixes)
        columns = past + longest
        pad = self.pad_id
        ids = torch.tensor([[pad] * (longest - len(x)) + x for x in suffixes], device=self.device)
        cache = KVCache.empty(self.forward, len(seqs), columns + GROWTH)
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
        with self.threads():
            logits = self.forward(ids, position_ids, mask, cache)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        self._remember_prompts(prompts, cache, mask)
        if not rerun:
            for seq, (m, _) in zip(seqs, matches, strict=True):
                seq.cached_tokens = m
        metrics.PREFILL_BATCH.labels(**self._labels).observe(len(seqs))
        metrics.PROMPT_TOKENS.labels(**self._labels).inc(int(lengths.sum()))
        metrics.PREFIX_CACHE_HITS.labels(**self._labels).inc(sum(m for m, _ in matches))
        metrics.PREFIX_CACHE_BYTES.labels(**self._labels).set(self.prefixes.bytes)
        self._merge(cache, mask, lengths)
        return logits

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """Run every row's last token; returns the next logits, one row each."""
        assert self._mask is not None and self._positions is not None
        assert self._next_tokens is not None and self._cache is not None
        assert self.forward is not None
        self._mask = torch.cat(
            [self._mask, torch.ones(self.rows, 1, dtype=self._mask.dtype, device=self.device)],
            dim=1,
        )
        with self.threads():
            logits = self.forward(
                self._next_tokens[:, None], self._positions[:, None], self._mask, self._cache
            )
        self._positions = self._positions + 1
        return logits

    @torch.inference_mode()
    def verify(self, drafts: list[list[int]]) -> torch.Tensor:
        """Run every row's last token and then its ``drafts`` (none for some rows) in one
        step; returns the logits of every column, [rows, 1 + longest draft, vocab] (a row's
        columns past its own draft are padding). ``settle`` then says what was kept."""
        assert self._mask is not None and self._positions is not None
        assert self._next_tokens is not None and self._cache is not None
        assert self.forward is not None
        width = 1 + max(len(d) for d in drafts)
        ids = torch.full((self.rows, width), self.pad_id, dtype=torch.long)
        for row, draft in enumerate(drafts):
            ids[row, 1 : 1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
        ids = ids.to(self.device)
        ids[:, 0] = self._next_tokens
        lengths = torch.tensor([1 + len(d) for d in drafts], device=self.device)
        offsets = torch.arange(width, device=self.device)
        real = offsets[None, :] < lengths[:, None]
        positions = self._positions[:, None] + torch.where(real, offsets, 0)
        self._mask = torch.cat([self._mask, real.to(self._mask.dtype)], dim=1)
        self._verifying = width
        with self.threads():
            return self.forward(ids, positions, self._mask, self._cache, every=True)

    def settle(self, kept: list[int]) -> None:
        """After ``verify``: row ``i`` kept its first ``kept[i]`` draft tokens. Columns of
        the rejected ones become padding, and those no row kept are cut."""
        assert self._mask is not None and self._positions is not None
        assert self._cache is not None
        ran = torch.tensor([1 + k for k in kept], device=self.device)
        width = self._verifying
        start = self._mask.shape[1] - width
        offsets = torch.arange(width, device=self.device)
        self._mask[:, start:] *= (offsets[None, :] < ran[:, None]).to(self._mask.dtype)
        used = int(ran.max())
        self._mask = self._mask[:, : start + used]
        self._cache.length -= width - used
        self._positions = self._positions + ran
        if self._cache.length - int(self._mask.sum(dim=1).max()) >= self.holes:
            self._pack()

    def _pack(self) -> None:
        """Gather each row's real columns to the right end, dropping every hole."""
        assert self._mask is not None and self._cache is not None
        columns = int(self._mask.sum(dim=1).max())
        # Per row, padding columns first and real ones after, each in their own order.
        order = torch.argsort(self._mask, dim=1, stable=True)[:, -columns:]
        self._cache.pack(order)
        self._mask = self._mask.gather(1, order)

    def accept(self, first_row: int, tokens: torch.Tensor) -> None:
        """The tokens sampled for rows ``first_row``..., to run in the next decode step."""
        assert self._next_tokens is not None
        self._next_tokens[first_row : first_row + len(tokens)] = tokens

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` and cut the padding columns no row needs any more."""
        if not keep:
            self.reset()
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
        self.rows = len(keep)

    def reset(self) -> None:
        """Drop the batch."""
        self.rows = 0
        self._cache = self._mask = self._positions = self._next_tokens = None

    def release(self) -> None:
        """Drop every reference to the model's tensors."""
        self.forward = None
        self.prefixes.clear()
        metrics.PREFIX_CACHE_BYTES.labels(**self._labels).set(0)
        self.reset()

    def _remember_prompts(
        self, prompts: list[list[int]], cache: KVCache, mask: torch.Tensor
    ) -> None:
        """Keep each prompt's keys and values (its row's real columns) in the prefix cache."""
        if self.prefixes.budget <= 0:
            return
        used = cache.data[..., : mask.shape[1], :]
        for row, prompt in enumerate(prompts):
            self.prefixes.insert(prompt, used[:, :, row, :, mask[row].bool()])

    def _merge(self, cache: KVCache, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        tokens = torch.zeros(len(lengths), dtype=torch.long, device=self.device)
        if self.rows == 0:
            self._cache, self._mask, self._positions = cache, mask, lengths
            self._next_tokens = tokens
            self.rows = len(lengths)
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
        self.rows += len(lengths)
