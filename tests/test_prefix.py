"""The prefix cache's radix tree: what it finds, what it stores once, what it lets go."""

from __future__ import annotations

import torch

from neuron.prefix import PrefixCache

LAYERS, HEADS, DIM = 2, 3, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4  # float32


def kv_of(ids: list[int]) -> torch.Tensor:
    """Keys and values that spell their tokens: column i holds ids[i] everywhere."""
    column = torch.tensor(ids, dtype=torch.float32)[None, None, None, :, None]
    return column.expand(LAYERS, 2, HEADS, len(ids), DIM).clone()


def found(cache: PrefixCache, ids: list[int]) -> tuple[int, list[int]]:
    """How much of ``ids`` the cache holds, and the tokens its keys and values spell."""
    n, pieces = cache.match(ids)
    spelled = torch.cat(pieces, dim=3)[0, 0, 0, :, 0].int().tolist() if pieces else []
    return n, spelled


def test_the_longest_cached_beginning_is_found_across_split_runs() -> None:
    cache = PrefixCache(1 << 20)
    system = [1, 2, 3, 4, 5]
    cache.insert([*system, 10, 11], kv_of([*system, 10, 11]))
    assert found(cache, [*system, 10, 11, 12]) == (7, [*system, 10, 11])
    assert found(cache, [*system, 10, 99]) == (6, [*system, 10])
    assert found(cache, [9, 1, 2]) == (0, [])

    # A second prompt with the same beginning splits the run; the beginning is held once.
    cache.insert([*system, 20], kv_of([*system, 20]))
    assert cache.bytes == 8 * TOKEN_BYTES
    assert found(cache, [*system, 20, 21]) == (6, [*system, 20])
    assert found(cache, [*system, 10, 11]) == (7, [*system, 10, 11])
    assert found(cache, [1, 2, 3]) == (3, [1, 2, 3])

    # A prompt that extends a cached one adds only its new tokens.
    cache.insert([*system, 10, 11, 12, 13], kv_of([*system, 10, 11, 12, 13]))
    assert cache.bytes == 10 * TOKEN_BYTES
    assert found(cache, [*system, 10, 11, 12, 13, 14]) == (9, [*system, 10, 11, 12, 13])


def test_least_recently_used_leaves_go_first_and_the_bound_holds() -> None:
    cache = PrefixCache(9 * TOKEN_BYTES)
    cache.insert([1, 2, 3, 4], kv_of([1, 2, 3, 4]))
    cache.insert([1, 2, 5, 6], kv_of([1, 2, 5, 6]))  # held: 1 2 | 3 4 | 5 6
    cache.match([1, 2, 3, 4])  # 3 4 is now used more recently than 5 6
    cache.insert([7, 8, 9, 10], kv_of([7, 8, 9, 10]))  # 10 tokens: past the bound
    assert cache.bytes == 8 * TOKEN_BYTES
    assert found(cache, [1, 2, 5, 6]) == (2, [1, 2])  # the least recently used leaf went
    assert found(cache, [1, 2, 3, 4]) == (4, [1, 2, 3, 4])
    assert found(cache, [7, 8, 9, 10]) == (4, [7, 8, 9, 10])

    # A prompt larger than the whole bound is not kept, and takes nothing else with it.
    before = cache.bytes
    cache.insert(list(range(100, 120)), kv_of(list(range(100, 120))))
    assert found(cache, [100, 101]) == (0, [])
    assert cache.bytes == before


def test_off_and_cleared_hold_nothing() -> None:
    off = PrefixCache(0)
    off.insert([1, 2, 3], kv_of([1, 2, 3]))
    assert (off.bytes, found(off, [1, 2, 3])) == (0, (0, []))
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3], kv_of([1, 2, 3]))
    cache.clear()
    assert (cache.bytes, found(cache, [1, 2, 3])) == (0, (0, []))
