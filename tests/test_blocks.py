"""The paged KV cache's blocks: handed out and let go, shared by prompts that begin alike,
kept for them while idle within their bound, and taken back when the pool needs the room."""

from __future__ import annotations

import pytest

from neuron.engine.blocks import Blocks, OutOfBlocks, needed, pool_blocks
from neuron.model.forward import BLOCK

SYSTEM = list(range(100, 100 + 2 * BLOCK))  # two whole blocks


def test_blocks_are_handed_out_until_none_is_left_and_come_back_when_let_go() -> None:
    blocks = Blocks(5, cache_blocks=0)  # block 0 is scratch: four to hand out
    first = blocks.allocate(3)
    assert 0 not in first and len(set(first)) == 3 and blocks.held == 3
    with pytest.raises(OutOfBlocks):
        blocks.allocate(2)
    assert blocks.available == 1  # a refused allocation takes nothing
    blocks.release(first)
    assert blocks.available == 4 and blocks.held == 0
    # The blocks let go last are handed out first (their memory is already in use).
    assert blocks.allocate(1) == [first[-1]]


def test_a_prompt_takes_the_cached_blocks_of_its_beginning_and_shares_them() -> None:
    blocks = Blocks(16, cache_blocks=8)
    prompt = [*SYSTEM, 1, 2, 3]
    table = blocks.allocate(needed(len(prompt)))
    blocks.publish(prompt, table)
    assert blocks.cached == 2  # the whole blocks only; the third is partly written
    # Same beginning, another ending: the two blocks are shared, held by both rows.
    other = blocks.match([*SYSTEM, 7, 8])
    assert other == table[:2]
    # A prompt that differs inside the second block shares only the first.
    assert blocks.match([*SYSTEM[:BLOCK], *SYSTEM[BLOCK:-1], 9]) == table[:1]
    # Same tokens at another place are another beginning.
    assert blocks.match([5, *SYSTEM]) == []
    blocks.release(table)
    # Still held by the rows that matched: neither free nor idle.
    assert blocks.available == 16 - 1 - 2
    blocks.release(other)
    blocks.release(table[:1])
    assert blocks.available == 15 and blocks.cached == 2


def test_idle_cached_blocks_are_kept_within_their_bound_least_recently_used_out() -> None:
    blocks = Blocks(32, cache_blocks=2)
    tables = []
    for first in (1, 2, 3):
        prompt = [first] * BLOCK
        table = blocks.allocate(1)
        blocks.publish(prompt, table)
        tables.append(table)
    assert blocks.cached == 3
    blocks.release(tables[0])
    blocks.release(tables[1])
    assert blocks.match([1] * BLOCK) == tables[0]  # used again: now the most recent
    blocks.release(tables[0])
    blocks.release(tables[2])  # a third idle one: the least recently used (2) goes
    assert blocks.cached == 2
    assert blocks.match([2] * BLOCK) == []
    assert blocks.match([1] * BLOCK) == tables[0]


def test_an_allocation_takes_idle_cached_blocks_back_when_nothing_else_is_free() -> None:
    blocks = Blocks(4, cache_blocks=8)
    prompt = list(range(3 * BLOCK))
    table = blocks.allocate(3)
    blocks.publish(prompt, table)
    blocks.release(table)
    assert blocks.available == 3 and blocks.cached == 3
    taken = blocks.allocate(2)
    assert blocks.cached == 1 and set(taken) < set(table)
    # What was taken back no longer answers for its tokens; the beginning is gone with it.
    assert blocks.match(prompt) == []


def test_without_a_prefix_cache_nothing_is_published_or_matched() -> None:
    blocks = Blocks(8, cache_blocks=0)
    table = blocks.allocate(2)
    blocks.publish(SYSTEM, table)
    assert blocks.cached == 0 and blocks.match(SYSTEM) == []


def test_clear_forgets_every_beginning() -> None:
    blocks = Blocks(8, cache_blocks=8)
    table = blocks.allocate(2)
    blocks.publish(SYSTEM, table)
    blocks.release(table)
    blocks.clear()
    assert blocks.cached == 0 and blocks.available == 7 and blocks.match(SYSTEM) == []


def test_a_pool_holds_a_full_batch_at_the_context_unless_told_fewer_tokens() -> None:
    assert pool_blocks(0, 4, 100) == needed(400) + 1
    assert pool_blocks(0, 4, 128) == 4 * 128 // BLOCK + 1
    assert pool_blocks(64, 4, 128) == needed(128) + 1  # never less than one whole context
    assert pool_blocks(1000, 4, 128) == needed(1000) + 1
